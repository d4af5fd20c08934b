"""The mini Wan: a small diffusers ``WanTransformer3DModel`` trained here, and its checkpoint format.

No pretrained video DiT can be downloaded here, so the quality study trains its own. The network is
Wan2.1's architecture unchanged (3D RoPE, RMS qk-norm across heads, cross-attention, AdaLN-style
timestep modulation), only small: by default 6 layers, 4 heads x head_dim 64 (so the Triton kernels'
D in {64, 128} applies), FFN 1024, working in pixel space (``in_channels = 3``, no autoencoder) on
16 x 32 x 32 videos, i.e. a 16 x 16 x 16 = 4,096-token latent grid after the 1x2x2 patchify.

Text conditioning: the "prompt" is a class id (:mod:`harness.quality.data`). :class:`MiniWan` maps it
to a learned sequence of ``text_len`` embeddings of width ``text_dim``, which Wan's own text projection
and cross-attention then consume exactly as they would T5 features. With ``null_class`` the table has one
more row, the null class (Wan's empty prompt): training replaces labels by it with the recipe's
``label_dropout`` and the sampler's classifier-free guidance contrasts it with the class.
:func:`add_null_class` gives a model trained without one its null row (the mean of the class rows).

Checkpoint format (a directory):

* ``model-0000k-of-0000n.safetensors``: the state dict in shards, each below ``max_shard_bytes``
  (default 15 MB, so every file stays under 16 MB). Every shard's safetensors metadata carries the
  format tag, the model config (JSON) and its own index, so shards are self-describing.
* ``card.json``: how the model was trained (config, steps, batch, lr, schedule, val loss, git SHA, card).
* ``README.md``: the same, for people.

:func:`load_checkpoint` turns every kind of damage (no shards, a missing shard, a file that is not
safetensors, configs that disagree, missing or mis-shaped tensors) into a :class:`CheckpointError`
whose message names the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salad_bench.harness.quality.data import NUM_CLASSES, VideoSpec

__all__ = [
    "CheckpointError",
    "MiniWan",
    "MiniWanConfig",
    "add_null_class",
    "base_state_dict",
    "count_parameters",
    "load_checkpoint",
    "load_finetuned",
    "save_checkpoint",
    "save_finetuned",
    "write_card",
]

FORMAT = "salad-mini-wan/1"
FINETUNED_FORMAT = "salad-mini-wan-finetuned/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the offending file."""


@dataclass(frozen=True)
class MiniWanConfig:
    """Size of the mini Wan and of the videos it models. Defaults: about 7M parameters."""

    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1024
    text_dim: int = 64
    text_len: int = 4
    num_classes: int = NUM_CLASSES
    freq_dim: int = 256
    qk_norm: str = "rms_norm_across_heads"
    cross_attn_norm: bool = True
    eps: float = 1e-6
    frames: int = 16
    height: int = 32
    width: int = 32
    patch: tuple[int, int, int] = (1, 2, 2)
    data_version: int = 1  # the procedural dataset's version (harness/quality/data.py); 1 in older cards
    null_class: bool = False  # one more prompt row, the null class (classifier-free guidance); False in older cards

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", tuple(self.patch))
        if self.num_classes > NUM_CLASSES:
            raise ValueError(f"num_classes={self.num_classes} exceeds the dataset's {NUM_CLASSES} classes")
        if not isinstance(self.null_class, bool):
            raise ValueError(f"null_class must be true or false; got {self.null_class!r}")

    @property
    def spec(self) -> VideoSpec:
        return VideoSpec(
            frames=self.frames, height=self.height, width=self.width, patch=self.patch, version=self.data_version
        )

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.spec.grid

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniWanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MiniWanConfig fields: {', '.join(unknown)}")
        return cls(**{**d, "patch": tuple(d.get("patch", (1, 2, 2)))})


class MiniWan(nn.Module):
    """Class-conditioned Wan DiT: ``forward(x (B,3,T,H,W), t (B,) in [0,1], labels (B,)) -> velocity``.

    ``labels`` are class ids, or :attr:`null_label` (the empty prompt) when the config has ``null_class``.
    """

    def __init__(self, config: MiniWanConfig) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.config = config
        self.transformer = WanTransformer3DModel(
            patch_size=config.patch,
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=config.text_dim,
            freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
            cross_attn_norm=config.cross_attn_norm,
            qk_norm=config.qk_norm,
            eps=config.eps,
        )
        rows = config.num_classes + int(config.null_class)
        self.prompt = nn.Embedding(rows, config.text_len * config.text_dim)
        nn.init.normal_(self.prompt.weight, std=1.0)

    @property
    def null_label(self) -> int | None:
        """The null class's id (the last prompt row), or None for a model without one."""
        return self.config.num_classes if self.config.null_class else None

    def text(self, labels: torch.Tensor) -> torch.Tensor:
        """The class's "text embedding" sequence ``(B, text_len, text_dim)``."""
        return self.prompt(labels).view(labels.shape[0], self.config.text_len, self.config.text_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        timestep = (t.float() * 1000.0).to(x.device)  # Wan's timestep scale
        out = self.transformer(x, timestep, self.text(labels), return_dict=False)[0]
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def add_null_class(model: MiniWan) -> MiniWan:
    """A copy of ``model`` (trained without a null class) with one: the same weights, and the null row
    of the prompt table set to the mean of the class rows (the empty prompt starts at the classes' centre,
    not at a random point, so guidance starts close to the conditional model). Outputs for class labels are
    unchanged. ``model`` is left as it is; the global random state is not touched."""
    if model.config.null_class:
        raise ValueError("add_null_class: the model already has a null class; use it as it is")
    state = base_state_dict(model)
    weight = state["prompt.weight"]
    state["prompt.weight"] = torch.cat([weight, weight.mean(0, keepdim=True)])
    with torch.random.fork_rng(devices=[]):
        out = MiniWan(dataclasses.replace(model.config, null_class=True))
    out.load_state_dict(state, strict=True)
    return out.to(weight.device).train(model.training)


# -- checkpoints ----------------------------------------------------------------------------------
def _shard_name(k: int, n: int, stem: str = "model") -> str:
    return f"{stem}-{k:05d}-of-{n:05d}.safetensors"


def save_checkpoint(
    model: MiniWan, out_dir: str | Path, card: dict[str, Any] | None = None, *, max_shard_bytes: int = 15 * 10**6,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write ``model`` as safetensors shards (each < ``max_shard_bytes``) plus card.json/README.md.

    Only the base model's own tensors are written (an installed attention method's parameters are
    not part of the mini Wan). ``dtype`` (e.g. ``torch.bfloat16``) casts the floating tensors on the
    way out; :func:`load_checkpoint` casts them back into the fp32 model. Returns the shard paths.
    """
    out = Path(out_dir)
    meta = {"format": FORMAT, "config": json.dumps(model.config.as_dict(), sort_keys=True)}
    state = base_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    paths = _write_shards(state, out, "model", meta, max_shard_bytes)
    if card is not None:
        write_card(out, {**card, "model_config": model.config.as_dict(), "shards": [p.name for p in paths],
                         "shard_sha256": shard_digests(paths)})
    return paths


def shard_digests(paths: list[Path]) -> dict[str, str]:
    """``{file name: sha256 hex}`` of each shard, written into the card and checked on load."""
    return {p.name: _sha256(p) for p in paths}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(d: str | Path) -> dict[str, Any]:
    """A checkpoint's ``card.json`` (``{}`` when it has none); a card that is not a JSON object, or whose
    ``shard_sha256`` or ``model_config`` is not one, raises :class:`CheckpointError`."""
    path = Path(d) / "card.json"
    if not path.exists():
        return {}
    fix = "restore it from the checkpoint's source (git checkout) or retrain"
    try:
        card = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: holds a {type(card).__name__}, not a card (a JSON object); {fix}")
    for key in ("shard_sha256", "model_config"):
        if card.get(key) is not None and not isinstance(card[key], dict):
            raise CheckpointError(f"{path}: {key} is {card[key]!r}, not a JSON object; {fix}")
    return card


def _verify_digests(d: Path, names: list[str]) -> None:
    """Check each shard against the sha256 its ``card.json`` records (a flipped byte in a tensor's data
    loads silently otherwise). A card without digests (written before they existed) is not checked."""
    digests = read_card(d).get("shard_sha256") or {}
    for name in names:
        want = digests.get(name)
        if want is not None and _sha256(d / name) != want:
            raise CheckpointError(
                f"{d / name}: sha256 differs from the one in card.json: the shard is damaged; "
                "restore it (git checkout, or copy it again) or retrain"
            )


def _check_finite(state: dict[str, torch.Tensor], where: dict[str, Path]) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where[name]}: tensor {name} holds NaN or Inf; the checkpoint is unusable, retrain it")


def _write_shards(
    state: dict[str, torch.Tensor], out: Path, stem: str, meta: dict[str, str], max_shard_bytes: int
) -> list[Path]:
    """Write ``state`` as ``<stem>-0000k-of-0000n.safetensors`` shards (each < ``max_shard_bytes``; old
    shards of that stem are removed first), every shard carrying ``meta`` plus its index."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if nbytes > max_shard_bytes:
            raise ValueError(f"tensor {name} ({nbytes} bytes) is larger than max_shard_bytes={max_shard_bytes}")
        if size + nbytes > max_shard_bytes - 64 * 1024:  # leave room for the safetensors header
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    for old in out.glob(f"{stem}-*-of-*.safetensors"):
        old.unlink()
    paths = []
    for k, shard in enumerate(shards, 1):
        path = out / _shard_name(k, len(shards), stem)
        save_file(shard, str(path), metadata={**meta, "shard": str(k), "num_shards": str(len(shards))})
        paths.append(path)
    return paths


def _read_shards(d: Path, stem: str) -> tuple[list[tuple[Path, dict[str, str]]], dict[str, torch.Tensor], dict[str, Path]]:
    """Every ``<stem>-*-of-*.safetensors`` shard of ``d``, checked complete: ``([(path, metadata)],
    tensors, tensor -> its file)``."""
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    pattern = re.compile(rf"^{re.escape(stem)}-(\d{{5}})-of-(\d{{5}})\.safetensors$")
    names = sorted(p.name for p in d.iterdir() if pattern.match(p.name))
    if not names:
        raise CheckpointError(f"{d}: no {stem}-*-of-*.safetensors shards in this directory")
    totals = {int(pattern.match(n).group(2)) for n in names}  # type: ignore[union-attr]
    if len(totals) != 1:
        raise CheckpointError(f"{d}: shards disagree on the shard count ({sorted(totals)}): {', '.join(names)}")
    n = totals.pop()
    for k in range(1, n + 1):
        if _shard_name(k, n, stem) not in names:
            raise CheckpointError(f"{d / _shard_name(k, n, stem)}: shard {k} of {n} is missing")
    _verify_digests(d, [_shard_name(k, n, stem) for k in range(1, n + 1)])
    metas: list[tuple[Path, dict[str, str]]] = []
    state: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for k in range(1, n + 1):
        path = d / _shard_name(k, n, stem)
        meta, tensors = _open_shard(path)
        metas.append((path, meta))
        state.update(tensors)
        where.update({name: path for name in tensors})
    _check_finite(state, where)
    return metas, state, where


def save_finetuned(
    model: nn.Module, params: list[nn.Parameter], out_dir: str | Path, info: dict[str, Any], *,
    max_shard_bytes: int = 15 * 10**6,
) -> list[Path]:
    """Write the parameters a fine-tuning trained (``params``, named by their path in ``model``) as
    ``trained-*-of-*.safetensors`` shards plus ``card.json`` (``info``: method, knobs, base checkpoint,
    steps...). Load them back onto a freshly installed model with :func:`load_finetuned`."""
    ids = {id(p) for p in params}
    state = {name: p for name, p in model.named_parameters(remove_duplicate=True) if id(p) in ids}
    if len(state) != len(ids):
        raise ValueError("some trained parameters are not parameters of the model")
    meta = {"format": FINETUNED_FORMAT, "info": json.dumps(info, sort_keys=True, default=str)}
    out = Path(out_dir)
    paths = _write_shards(state, out, "trained", meta, max_shard_bytes)
    card = {**info, "format": FINETUNED_FORMAT, "tensors": len(state), "elements": sum(p.numel() for p in state.values()),
            "shards": [p.name for p in paths], "shard_sha256": shard_digests(paths)}
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    return paths


def load_finetuned(model: nn.Module, ckpt_dir: str | Path) -> dict[str, Any]:
    """Copy a :func:`save_finetuned` checkpoint into ``model`` (the base with the same method installed);
    returns its info. Every saved tensor must exist in ``model`` with the same shape."""
    d = Path(ckpt_dir)
    metas, state, where = _read_shards(d, "trained")
    for path, meta in metas:
        if meta.get("format") != FINETUNED_FORMAT:
            raise CheckpointError(f"{path}: not a fine-tuned checkpoint (format={meta.get('format')!r})")
    own = dict(model.named_parameters(remove_duplicate=True))
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(
            f"{where[unknown[0]]}: holds {', '.join(unknown[:3])}, which the model does not have "
            "(install the same method with the same knobs before loading)"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise CheckpointError(f"{where[name]}: {name} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}")
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))
    return json.loads(metas[0][1].get("info", "{}"))


def base_state_dict(model: MiniWan) -> dict[str, torch.Tensor]:
    """The mini Wan's own tensors, without any installed attention method's submodules."""
    fresh_keys = _base_keys(model.config)
    state = model.state_dict()
    missing = sorted(fresh_keys - set(state))
    if missing:
        raise KeyError(f"model lacks base tensors {missing[:5]} (was an attention method installed that renames them?)")
    return {k: state[k] for k in sorted(fresh_keys)}


_KEY_CACHE: dict[str, set[str]] = {}


def _base_keys(config: MiniWanConfig) -> set[str]:
    key = json.dumps(config.as_dict(), sort_keys=True)
    if key not in _KEY_CACHE:
        with torch.device("meta"):
            _KEY_CACHE[key] = set(MiniWan(config).state_dict())
    return _KEY_CACHE[key]


def write_card(out_dir: str | Path, card: dict[str, Any]) -> None:
    """Write ``card.json`` and a README.md rendered from it."""
    out = Path(out_dir)
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    lines = [
        "# mini-wan: a small Wan2.1-architecture video DiT trained here",
        "",
        "Trained from scratch by `python -m salad_bench.harness.quality.train_base` on the procedural video dataset of",
        "`harness/quality/data.py` (full attention, flow matching). Load it with",
        "`harness.quality.model.load_checkpoint(DIR)`. See docs/QUALITY.md for the whole study.",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in sorted(card):
        val = card[key]
        if isinstance(val, (dict, list)):
            val = json.dumps(val, sort_keys=True, default=str)
        lines.append(f"| {key} | {str(val).replace('|', '/')} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _open_shard(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return meta, tensors


def load_checkpoint(ckpt_dir: str | Path, device: torch.device | str = "cpu") -> tuple[MiniWan, dict[str, Any]]:
    """Load a mini Wan saved by :func:`save_checkpoint`; returns ``(model, card)`` (card may be ``{}``)."""
    d = Path(ckpt_dir)
    metas, state, where = _read_shards(d, "model")
    card_path = d / "card.json"
    card = read_card(d)
    config_dict: dict[str, Any] | None = None
    for path, meta in metas:
        if meta.get("format") != FORMAT or "config" not in meta:
            raise CheckpointError(
                f"{path}: not a mini-wan shard (metadata format={meta.get('format')!r}, expected {FORMAT!r})"
            )
        cfg = json.loads(meta["config"])
        if config_dict is None:
            config_dict = cfg
        elif cfg != config_dict:
            raise CheckpointError(f"{path}: its model config differs from {metas[0][0]}'s")
    assert config_dict is not None
    if card.get("model_config") not in (None, config_dict):
        diff = sorted(
            k for k in set(config_dict) | set(card["model_config"]) if config_dict.get(k) != card["model_config"].get(k)
        )
        raise CheckpointError(f"{card_path}: model_config disagrees with the shards' config on {', '.join(diff)}")
    try:
        config = MiniWanConfig.from_dict(config_dict)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{metas[0][0]}: bad model config in metadata ({exc})") from None
    model = MiniWan(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{d}: tensors missing from every shard: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{where[extra[0]]}: holds tensors the config does not define: {', '.join(extra[:5])}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where[name]}: tensor {name} has shape {tuple(tensor.shape)} but the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.to(device), card


# the shard format for other small checkpoints of the study (the video classifier)
write_shards = _write_shards
read_shards = _read_shards
