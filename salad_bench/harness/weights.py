"""Real Wan2.1 weights: load a diffusers-format transformer or pipeline, generate a video with a method.

``--weights DIR`` takes a diffusers-format Wan2.1 directory (e.g. a local copy of
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: ``model_index.json`` plus ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), or its ``transformer/`` folder alone for timing.
Nothing is downloaded here (see docs/REAL_WEIGHTS.md).

Every file is checked before a tensor is read, and a bad directory raises :class:`WeightsError`
naming the file and what to do: a missing directory or ``config.json``, a ``config.json`` that is
not JSON or not a Wan2.1 transformer (an original-format ``WanModel`` config, a VACE/I2V variant, a
missing key), a ``.safetensors`` file whose header is garbage or whose size disagrees with it
(truncated download), a sharded index naming a missing shard, missing or unexpected tensors.

The transformer is built from its config on the target device in the target dtype (fp32 modules
kept as diffusers keeps them) and the safetensors are copied in shard by shard; this does not need
``accelerate``, which diffusers' own ``from_pretrained`` requires for Wan.
"""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path
from typing import Any

import torch

from salad_bench.harness.errors import BadInput, Parser

__all__ = [
    "WeightsError",
    "check_safetensors",
    "generate",
    "load_method_state",
    "load_pipeline",
    "load_transformer",
    "read_transformer_config",
    "transformer_dir",
    "write_mp4",
]

WAN_CLASS = "WanTransformer3DModel"
_REQUIRED = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "text_dim",
    "ffn_dim",
    "num_layers",
)
_HOWTO = "see docs/REAL_WEIGHTS.md (download Wan-AI/Wan2.1-T2V-1.3B-Diffusers and pass its directory to --weights)"
_PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")


class WeightsError(BadInput):
    """A weights directory that cannot be used; the message names the file and the fix."""


# -- checks ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing; {_HOWTO}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc}); the file is corrupt: re-download it ({_HOWTO})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(data).__name__}; re-download it")
    return data


def _check_dir(path: Path) -> Path:
    if not path.exists():
        raise WeightsError(f"weights directory {path} does not exist; {_HOWTO}")
    if not path.is_dir():
        raise WeightsError(f"--weights must be a directory, got the file {path}; {_HOWTO}")
    return path


def transformer_dir(weights_dir: str | Path) -> Path:
    """The folder holding the transformer's ``config.json``: ``DIR`` itself or ``DIR/transformer``."""
    root = _check_dir(Path(weights_dir))
    sub = root / "transformer"
    if (sub / "config.json").exists():
        return sub
    if (root / "config.json").exists():
        return root
    hint = (
        " (it has model_index.json, so transformer/ is missing or incomplete)"
        if (root / "model_index.json").exists()
        else ""
    )
    raise WeightsError(
        f"no config.json in {root} or {sub}{hint}; point --weights at a diffusers-format Wan2.1 directory: {_HOWTO}"
    )


def read_transformer_config(path: str | Path) -> dict[str, Any]:
    """Parse and check a transformer ``config.json`` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    cfg = _read_json(path)
    cls = cfg.get("_class_name")
    if cls == "WanModel" or ("dim" in cfg and "num_heads" in cfg):
        raise WeightsError(
            f"{path}: this is the original Wan repository format (WanModel), not diffusers format; download the "
            f"'-Diffusers' repository instead (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or convert it with diffusers' "
            f"scripts/convert_wan_to_diffusers.py"
        )
    if cls is not None and cls != WAN_CLASS:
        raise WeightsError(
            f"{path}: _class_name is {cls!r}, not {WAN_CLASS!r}; this harness runs Wan2.1 text-to-video transformers"
        )
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise WeightsError(
            f"{path}: not a Wan2.1 transformer config (missing {', '.join(missing)}); re-download it ({_HOWTO})"
        )
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        raise WeightsError(
            f"{path}: an image-to-video Wan transformer (image_dim/added_kv_proj_dim set); use a T2V checkpoint"
        )
    return cfg


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """Validate a ``.safetensors`` file without reading its tensors; returns its header.

    Format: 8-byte little-endian header length, a JSON header mapping names to dtype, shape and
    ``data_offsets``, then the data; the file must be exactly as long as the header says.
    """
    path = Path(path)
    fix = f"the file is corrupt or a partial download: delete it and download it again ({_HOWTO})"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: {size} bytes, too short to be a safetensors file; {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise WeightsError(f"{path}: header length {n} does not fit in the file ({size} bytes); {fix}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing; {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: the safetensors header is not valid JSON ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object; {fix}")
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has no valid data_offsets in the header; {fix}") from None
    if 8 + n + end != size:
        raise WeightsError(
            f"{path}: truncated or padded: the header needs {8 + n + end:,} bytes, the file has {size:,}; {fix}"
        )
    return header


def _weight_files(tdir: Path) -> list[Path]:
    index = sorted(tdir.glob("*.safetensors.index.json"))
    if index:
        data = _read_json(index[0])
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index[0]}: no weight_map; the index is corrupt: re-download it ({_HOWTO})")
        files = [tdir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(
                f"{index[0]} names shards that are missing from {tdir}: {', '.join(missing)}; finish the download ({_HOWTO})"
            )
        return files
    files = sorted(tdir.glob("*.safetensors"))
    if not files:
        bins = sorted(tdir.glob("*.bin"))
        what = f" (found {bins[0].name}: .bin checkpoints are not loaded, use the safetensors files)" if bins else ""
        raise WeightsError(f"no .safetensors weights in {tdir}{what}; {_HOWTO}")
    return files


# -- loading --------------------------------------------------------------------------------------


def load_transformer(
    weights_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` from ``DIR`` or ``DIR/transformer`` on ``device`` in ``dtype``, eval mode."""
    from salad_bench.harness.integrations.wan import _wan_class, new_transformer

    tdir = transformer_dir(weights_dir)
    cfg = read_transformer_config(tdir)
    files = _weight_files(tdir)
    for f in files:
        check_safetensors(f)
    cls = _wan_class()
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in cfg.items() if k in params}
    if "patch_size" in kwargs:
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    try:
        model = new_transformer(kwargs, device=device, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"{tdir / 'config.json'}: cannot build a {WAN_CLASS} from it ({exc}); re-download it ({_HOWTO})"
        ) from exc
    _copy_in(model, files, tdir)
    return model


def _copy_in(model: torch.nn.Module, files: list[Path], where: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = set(model.state_dict())
    ignore = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    seen: set[str] = set()
    unexpected: list[str] = []
    for f in files:
        try:
            sd = load_file(str(f), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise WeightsError(
                f"{f}: cannot be read ({exc}); the file is corrupt: delete it and download it again ({_HOWTO})"
            ) from exc
        unexpected += [k for k in sd if k not in expected and not any(p in k for p in ignore)]
        sd = {k: v for k, v in sd.items() if k in expected}
        try:
            model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:
            raise WeightsError(
                f"{f}: tensor shapes do not match {where / 'config.json'} ({str(exc).splitlines()[-1].strip()[:300]}); "
                f"the config and the weights come from different models: re-download the directory"
            ) from exc
        seen |= set(sd)
        del sd
    missing = sorted(expected - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(
            f"{where}: {'; '.join(parts)}; the weights do not match the config or are incomplete: re-download ({_HOWTO})"
        )


def _is_method_key(key: str) -> bool:
    """A tensor an installed method owns: its module's (``.sparse_method.``) or the LoRA it had installed
    on the self-attention projections (``attn1.to_q.lora_A.default.weight``, sparse_lora)."""
    return ".sparse_method." in key or (".attn1." in key and ".lora_" in key)


def load_method_state(model: torch.nn.Module, path: str | Path) -> None:
    """Load trained method parameters (``blocks.<i>.attn1.sparse_method.*``, e.g. SALAD's projection
    and gate, and LoRA on the projections, ``blocks.<i>.attn1.to_q.lora_A.default.weight``) from a
    safetensors or torch file into a model that already has the method installed."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"method state {path} does not exist")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k: v for k, v in sd.items() if _is_method_key(k)}
    own = {k for k in model.state_dict() if _is_method_key(k)}
    if not own:
        raise WeightsError(f"{path}: the model has no installed method to load into; call install_attention first")
    missing, extra = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or extra:
        raise WeightsError(
            f"{path}: method state does not match the installed method ({len(missing)} missing e.g. {missing[:2]}, "
            f"{len(extra)} unexpected e.g. {extra[:2]}); install the method the state was trained with"
        )
    model.load_state_dict(sd, strict=False)


def _transformers_dtype_kw(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_pipeline(
    weights_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype = torch.float32,
) -> Any:
    """A diffusers ``WanPipeline`` from a full diffusers-format directory (transformer and text
    encoder in ``dtype``, VAE in ``vae_dtype``: fp32 as the Wan model card recommends)."""
    from salad_bench.harness.integrations import require_diffusers

    diffusers = require_diffusers()
    root = _check_dir(Path(weights_dir))
    index = root / "model_index.json"
    if not index.exists():
        raise WeightsError(
            f"{index}: missing; generating a video needs the whole pipeline (tokenizer, text_encoder, vae, scheduler, "
            f"transformer), not only a transformer: {_HOWTO}"
        )
    spec = _read_json(index)
    absent = [p for p in _PIPELINE_PARTS if p not in spec or not (root / p).is_dir()]
    if absent:
        raise WeightsError(
            f"{root}: pipeline components missing: {', '.join(absent)} (listed in {index} and as folders); finish the download ({_HOWTO})"
        )
    transformer = load_transformer(root, device=device, dtype=dtype)
    for part in ("vae", "text_encoder"):  # check the files before the slow loads
        _read_json(root / part / "config.json")
        for f in _weight_files(root / part):
            check_safetensors(f)
    try:
        from transformers import AutoTokenizer, UMT5EncoderModel

        vae = diffusers.AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=vae_dtype)
        text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", **_transformers_dtype_kw(dtype))
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        sched_cls = getattr(diffusers, spec["scheduler"][1])
        scheduler = sched_cls.from_pretrained(root / "scheduler")
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad directory; say which
        raise WeightsError(
            f"{root}: loading a pipeline component failed: {type(exc).__name__}: {exc}; re-download ({_HOWTO})"
        ) from exc
    pipe = diffusers.WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    return pipe.to(device)


# -- generation -----------------------------------------------------------------------------------


def write_mp4(frames: Any, path: str | Path, fps: int = 16) -> Path:
    """Write frames ``(F, H, W, 3)`` (float in [0, 1] or uint8) to an H.264 mp4 via imageio-ffmpeg."""
    import imageio.v2 as imageio
    import numpy as np

    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3); got {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p", macro_block_size=16) as w:
        for frame in arr:
            w.append_data(frame)
    return path


def generate(
    weights_dir: str | Path | None,
    prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    method: str | None,
    sparsity: float,
    out_mp4: str | Path,
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    *,
    negative_prompt: str = "",
    device: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    fps: int = 16,
    knobs: dict[str, Any] | None = None,
    flow_shift: float | None = None,
    method_state: str | Path | None = None,
    max_sequence_length: int = 512,
    pipe: Any = None,
) -> Path:
    """Generate one video with ``method`` (None or ``full`` = dense) in every self-attention layer.

    The seed drives a CPU generator (same initial noise on any device). ``flow_shift`` swaps in
    UniPC with that shift (the Wan model card: 3.0 at 480p, 5.0 at 720p); default: the scheduler the
    directory ships. Writes ``out_mp4`` and ``out_mp4 + '.json'`` (settings and the measured mean
    density over all layers and steps). Pass ``pipe`` to reuse a loaded pipeline across videos.
    """
    from salad_bench.harness.integrations.wan import (
        install_attention,
        installed_methods,
        restore_attention,
        set_step,
        step_callback,
    )

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if pipe is None:
        if weights_dir is None:
            raise WeightsError(f"no weights directory given; {_HOWTO}")
        pipe = load_pipeline(weights_dir, device=device, dtype=dtype)
    if flow_shift is not None:
        from diffusers import UniPCMultistepScheduler

        pipe.scheduler = UniPCMultistepScheduler.from_config(
            pipe.scheduler.config, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
        )
    model = pipe.transformer
    name = method or "full"
    install_attention(model, name, sparsity=sparsity, num_steps=steps, **(knobs or {}))
    densities: list[float] = []
    try:
        if method_state is not None:
            load_method_state(model, method_state)
        set_step(model, 0, steps)
        on_step = step_callback(model)

        def callback(p, i, t, kw):
            densities.extend(m.report().density for m in installed_methods(model))
            return on_step(p, i, t, kw)

        with torch.inference_mode():
            out = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="np",
                callback_on_step_end=callback,
                max_sequence_length=max_sequence_length,
            )
    finally:
        restore_attention(model)
    path = write_mp4(out.frames[0], out_mp4, fps=fps)
    meta = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "method": name,
        "sparsity_target": sparsity,
        "knobs": knobs or {},
        "density_mean": sum(densities) / len(densities) if densities else None,
        "num_frames": int(out.frames[0].shape[0]),
        "height": height,
        "width": width,
        "fps": fps,
        "flow_shift": flow_shift,
        "scheduler": type(pipe.scheduler).__name__,
        "weights": str(weights_dir) if weights_dir else None,
        "method_state": str(method_state) if method_state else None,
    }
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2))
    return path


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="python -m salad_bench.harness.weights", description="Check Wan2.1 weights or generate a video with a method."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a diffusers-format Wan2.1 directory without loading it")
    c.add_argument("weights")
    g = sub.add_parser("generate", help="generate one video")
    g.add_argument("--weights", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--method", default="full")
    g.add_argument("--sparsity", type=float, default=0.0)
    g.add_argument("--knobs", default="{}", help='JSON config overrides, e.g. {"sparse": "sta"}')
    g.add_argument("--method-state", default=None, help="trained method parameters (safetensors) to load")
    g.add_argument("--frames", type=int, default=81)
    g.add_argument("--height", type=int, default=480)
    g.add_argument("--width", type=int, default=832)
    g.add_argument("--flow-shift", type=float, default=None)
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    g.add_argument("--device", default=None)
    g.add_argument("--out", required=True, help="output .mp4")
    args = p.parse_args(argv)
    if args.cmd == "check":
        tdir = transformer_dir(args.weights)
        cfg = read_transformer_config(tdir)
        files = _weight_files(tdir)
        n = 0
        for f in files:
            n += sum(1 for k in check_safetensors(f) if k != "__metadata__")
        print(
            f"ok: {tdir} - {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, {n} tensors in {len(files)} file(s)"
        )
        return 0
    from salad_bench.harness.workloads import DTYPES

    dtype = DTYPES[args.dtype]
    path = generate(
        args.weights, args.prompt, args.seed, args.steps, args.guidance, args.method, args.sparsity, args.out,
        args.frames, args.height, args.width, negative_prompt=args.negative_prompt, device=args.device, dtype=dtype,
        knobs=json.loads(args.knobs), flow_shift=args.flow_shift, method_state=args.method_state,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    raise SystemExit(guarded(main))
