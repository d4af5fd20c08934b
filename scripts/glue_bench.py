import torch, triton
from triton.testing import do_bench
b,h,n,d = 1,12,32760,128
x = torch.randn(b,h,n,d, device="cuda", dtype=torch.bfloat16)
bias = torch.randn(h*d, device="cuda", dtype=torch.bfloat16)
perm = torch.randperm(n, device="cuda")
inv = torch.argsort(perm)
acc = torch.empty(b,n,h,d, device="cuda", dtype=torch.bfloat16)
def f_add(): torch.add(x.transpose(1,2), bias.view(h,d), out=acc)
def f_copy_add(): acc.copy_(x.transpose(1,2)); acc.add_(bias.view(h,d))
def f_copy(): acc.copy_(x.transpose(1,2))
def f_reshape(): x.transpose(1,2).reshape(b,n,h*d)
def f_mean_cast(): x.to(torch.float32).mean(dim=2)
def f_mean_dtype(): x.mean(dim=2, dtype=torch.float32)
def f_adv(): x[:, :, perm]
def f_isel(): torch.index_select(x, 2, perm)
def f_icopy(): torch.empty_like(x).index_copy_(2, perm, x)
def f_isel_inv(): torch.index_select(x, 2, inv)
y = x.transpose(1,2).contiguous()  # token-major
def f_isel_tm(): torch.index_select(y, 1, perm)
for name, f in list(globals().items()):
    if name.startswith("f_"):
        print(f"{name:14s} {do_bench(f, warmup=25, rep=100):.4f} ms")
