"""The quality study's experiment config (``harness/experiments/quality_study.toml``), read and checked.

A study (issue #25) is: a budget (training videos, steps, batch), a short learning-rate sweep per
(method, arm) that picks the rate by validation loss, then several seeds at that rate, over groups of
methods x target sparsities x arms, plus the full-attention control fine-tuned with the same recipe; and
the hypotheses the study tests, each naming its metric(s), comparison and threshold. The hypotheses live
in the config, not in code. Methods are named by registry name or glob, or chosen by the registry
(``trait:<t>``, ``family:<f>``). :func:`load_config` turns every problem into a :class:`StudyConfigError`
whose message names the key (``hypotheses[2].metrics``), which the CLIs report with exit status 2.

The tables (all keys but ``[study] name`` have defaults):

* ``[study]``: ``name``, ``checkpoint``, ``classifier`` (sample quality; default: the bar's),
  ``require_base_bar``, ``default_arm`` (rows of this arm are labelled by the method alone);
* ``[budget]``: ``train_videos``, ``steps``, ``batch``, ``warmup``, ``seeds``, ``checkpoint_every`` (steps
  between the resumable states of a fine-tuning);
* ``[sweep]``: ``steps``, ``seed``, ``sparsity`` (the target the rates are compared at);
* ``[eval]``: ``n_val``, ``n_eval``, ``sample_steps``, ``t_bands``, ``t_per_band``, ``latency``,
  ``save_samples``, ``keep_videos``, ``bootstrap_draws``, ``confidence``;
* ``[arms.<name>]``: ``train_params`` (all | method), ``objective`` (flow | distill), ``lrs``;
* ``[control]``: ``arm`` (the recipe the reference method is fine-tuned with);
* ``[[cells]]``: ``methods`` (selectors), ``sparsities``, ``arms`` (training-free methods are evaluated
  as they are, once per sparsity);
* ``[[hypotheses]]``: ``id``, ``claim``, ``method``, ``versus`` (a method, or ``@control``), ``arm``,
  ``versus_arm`` (default: ``arm``; the control's arm for ``@control``), ``sparsities``, ``metrics``,
  ``comparison`` (``within``: ``mean(method) / mean(versus) - 1 <= threshold``, for a lower-is-better
  metric; ``better``: the improvement of ``method`` over ``versus`` in the metric's better direction
  ``> threshold``), ``threshold``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["DEFAULT_CONFIG", "METRICS", "Arm", "CellGroup", "Hypothesis", "Metric", "StudyConfig", "StudyConfigError",
           "load_config", "metric", "select_methods"]  # fmt: skip

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "quality_study.toml"
CONTROL = "@control"


class StudyConfigError(ValueError):
    """A study config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Metric:
    """A row metric: its value field, its per-video field (None: a set statistic, resampled over seeds
    only) and which direction is better."""

    value: str
    per_video: str | None
    better: Literal["higher", "lower"]


METRICS: dict[str, Metric] = {
    "val_loss": Metric("val_loss", "val_loss_per_video", "lower"),
    "velocity_mse": Metric("velocity_mse", "velocity_mse_per_video", "lower"),
    "psnr": Metric("psnr", "psnr_per_video", "higher"),
    "ssim": Metric("ssim", "ssim_per_video", "higher"),
    "classifier_accuracy": Metric("classifier_accuracy", "classifier_correct_per_video", "higher"),
    "frechet_distance": Metric("frechet_distance", None, "lower"),
    "temporal_flickering": Metric("temporal_flickering", "temporal_flickering_per_video", "higher"),
}
_BAND = re.compile(r"(val_loss|velocity_mse)_band(\d+)")


def metric(name: str) -> Metric:
    """The metric ``name``: one of :data:`METRICS` or a band of one (``val_loss_band2``)."""
    if name in METRICS:
        return METRICS[name]
    m = _BAND.fullmatch(name)
    if m:
        return Metric(name, f"{name}_per_video", "lower")
    raise KeyError(name)


@dataclass(frozen=True)
class Arm:
    name: str
    train_params: Literal["all", "method"]
    objective: Literal["flow", "distill"]
    lrs: tuple[float, ...]


@dataclass(frozen=True)
class CellGroup:
    methods: tuple[str, ...]  # registry names, resolved
    sparsities: tuple[float, ...]
    arms: tuple[str, ...]


@dataclass(frozen=True)
class Hypothesis:
    id: str
    claim: str
    method: str
    versus: str  # a registry name or "@control"
    arm: str
    versus_arm: str
    sparsities: tuple[float, ...]
    metrics: tuple[str, ...]
    comparison: Literal["within", "better"]
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: str = ""
    checkpoint: str = "checkpoints/mini-wan-v2"
    classifier: str | None = None
    require_base_bar: bool = True
    default_arm: str = "ft"
    train_videos: int = 2000
    steps: int = 1600
    batch: int = 8
    warmup: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    checkpoint_every: int = 200
    sweep_steps: int = 400
    sweep_seed: int = 0
    sweep_sparsity: float = 0.9
    n_val: int = 32
    n_eval: int = 16
    sample_steps: int = 20
    t_bands: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    t_per_band: int = 2
    latency: bool = False
    save_samples: bool = False
    keep_videos: bool = False
    bootstrap_draws: int = 10000
    confidence: float = 0.95
    arms: dict[str, Arm] = field(default_factory=dict)
    control_arm: str = "ft"
    groups: tuple[CellGroup, ...] = ()
    hypotheses: tuple[Hypothesis, ...] = ()
    text: str = ""  # the file as read (copied into the run directory)


# -- reading ---------------------------------------------------------------------------------------
class _Reader:
    """Typed access to one table, naming ``where.key`` in every error."""

    def __init__(self, table: Any, where: str, src: str) -> None:
        if not isinstance(table, dict):
            raise StudyConfigError(f"{src}: {where} must be a table")
        self.t, self.where, self.src, self.used = table, where, src, set()

    def err(self, key: str, msg: str) -> StudyConfigError:
        return StudyConfigError(f"{self.src}: {self.where}.{key}: {msg}" if self.where else f"{self.src}: {key}: {msg}")

    def get(self, key: str, kind: Any, default: Any = ..., *, check=None) -> Any:
        self.used.add(key)
        if key not in self.t:
            if default is ...:
                raise self.err(key, "missing")
            return default
        v = self.t[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise self.err(key, f"must be {getattr(kind, '__name__', kind)}, got {v!r}")
        if check is not None:
            why = check(v)
            if why:
                raise self.err(key, why)
        return v

    def list_of(self, key: str, kind: Any, default: Any = ..., *, nonempty: bool = True, check=None) -> tuple:
        v = self.get(key, list, default)
        if v is default and default is not ...:
            return tuple(v)
        out = []
        for i, x in enumerate(v):
            if kind is float and isinstance(x, int) and not isinstance(x, bool):
                x = float(x)
            if not isinstance(x, kind) or (kind is int and isinstance(x, bool)):
                raise self.err(f"{key}[{i}]", f"must be {kind.__name__}, got {x!r}")
            if check is not None and (why := check(x)):
                raise self.err(f"{key}[{i}]", why)
            out.append(x)
        if nonempty and not out:
            raise self.err(key, "must not be empty")
        return tuple(out)

    def done(self) -> None:
        unknown = sorted(set(self.t) - self.used)
        if unknown:
            raise self.err(unknown[0], f"unknown key (known: {', '.join(sorted(self.used))})")


def _sparsity(x: float) -> str:
    return "" if 0.0 <= x < 1.0 else "must be in [0, 1)"


def _positive(x: float) -> str:
    return "" if x > 0 else "must be > 0"


def select_methods(selectors: tuple[str, ...], err) -> tuple[str, ...]:
    """Registry names for selectors: names or globs (``salad*``), ``trait:<t>``, ``family:<f>``; order kept."""
    from salad_bench.methods import METHODS
    from salad_bench.methods.base import FAMILIES, TRAITS
    from salad_bench.methods.registry import UnknownNameError

    out: list[str] = []
    for i, sel in enumerate(selectors):
        if sel.startswith("trait:"):
            trait = sel[6:]
            if trait not in TRAITS:
                raise err(f"[{i}]", f"unknown trait {trait!r}; traits: {', '.join(TRAITS)}")
            names = METHODS.with_trait(trait)
        elif sel.startswith("family:"):
            fam = sel[7:]
            if fam not in FAMILIES:
                raise err(f"[{i}]", f"unknown family {fam!r}; families: {', '.join(FAMILIES)}")
            names = [e.name for e in METHODS.entries() if e.family == fam]
        else:
            try:
                names = METHODS.select(sel)
            except (UnknownNameError, ValueError) as exc:
                raise err(f"[{i}]", str(exc)) from None
        out += [n for n in names if n not in out]
    return tuple(out)


def load_config(path: str | Path | None = None) -> StudyConfig:
    """Read and check a study config (default :data:`DEFAULT_CONFIG`)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    src = str(p)
    try:
        text = p.read_text()
        raw = tomllib.loads(text)
    except OSError as exc:
        raise StudyConfigError(f"{src}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{src}: not valid TOML ({exc})") from None
    top = _Reader(raw, "", src)
    study = _Reader(top.get("study", dict), "study", src)
    budget = _Reader(top.get("budget", dict, {}), "budget", src)
    sweep = _Reader(top.get("sweep", dict, {}), "sweep", src)
    ev = _Reader(top.get("eval", dict, {}), "eval", src)
    d = StudyConfig(name="")
    kw: dict[str, Any] = dict(
        name=study.get("name", str, check=lambda v: "" if re.fullmatch(r"[A-Za-z0-9_.-]+", v) else "letters, digits, _ . - only"),
        checkpoint=study.get("checkpoint", str, d.checkpoint),
        classifier=study.get("classifier", str, None),
        require_base_bar=study.get("require_base_bar", bool, d.require_base_bar),
        default_arm=study.get("default_arm", str, d.default_arm),
        train_videos=budget.get("train_videos", int, d.train_videos, check=lambda v: "" if v >= 1 else "must be >= 1"),
        steps=budget.get("steps", int, d.steps, check=lambda v: "" if v >= 1 else "must be >= 1"),
        batch=budget.get("batch", int, d.batch, check=lambda v: "" if v >= 1 else "must be >= 1"),
        warmup=budget.get("warmup", int, d.warmup, check=lambda v: "" if v >= 0 else "must be >= 0"),
        seeds=budget.list_of("seeds", int, d.seeds),
        checkpoint_every=budget.get("checkpoint_every", int, d.checkpoint_every, check=lambda v: "" if v >= 1 else "must be >= 1"),
        sweep_steps=sweep.get("steps", int, d.sweep_steps, check=lambda v: "" if v >= 1 else "must be >= 1"),
        sweep_seed=sweep.get("seed", int, d.sweep_seed),
        sweep_sparsity=sweep.get("sparsity", float, d.sweep_sparsity, check=_sparsity),
        n_val=ev.get("n_val", int, d.n_val, check=lambda v: "" if v >= 1 else "must be >= 1"),
        n_eval=ev.get("n_eval", int, d.n_eval, check=lambda v: "" if v >= 2 else "must be >= 2"),
        sample_steps=ev.get("sample_steps", int, d.sample_steps, check=lambda v: "" if v >= 1 else "must be >= 1"),
        t_bands=ev.list_of("t_bands", float, d.t_bands),
        t_per_band=ev.get("t_per_band", int, d.t_per_band, check=lambda v: "" if v >= 1 else "must be >= 1"),
        latency=ev.get("latency", bool, d.latency),
        save_samples=ev.get("save_samples", bool, d.save_samples),
        keep_videos=ev.get("keep_videos", bool, d.keep_videos),
        bootstrap_draws=ev.get("bootstrap_draws", int, d.bootstrap_draws, check=lambda v: "" if v >= 100 else "must be >= 100"),
        confidence=ev.get("confidence", float, d.confidence, check=lambda v: "" if 0.5 <= v < 1 else "must be in [0.5, 1)"),
        text=text,
        path=src,
    )  # fmt: skip
    if len(set(kw["seeds"])) != len(kw["seeds"]):
        raise budget.err("seeds", "repeats a seed")
    bands = kw["t_bands"]
    if len(bands) < 2 or any(b <= a for a, b in zip(bands, bands[1:], strict=False)) or bands[0] < 0 or bands[-1] > 1:
        raise ev.err("t_bands", "must be increasing edges inside [0, 1]")
    for r in (study, budget, sweep, ev):
        r.done()
    kw["arms"] = _arms(top, src)
    if kw["default_arm"] not in kw["arms"]:
        raise study.err("default_arm", f"{kw['default_arm']!r} is not one of the arms ({', '.join(kw['arms'])})")
    control = _Reader(top.get("control", dict, {}), "control", src)
    kw["control_arm"] = control.get("arm", str, kw["default_arm"])
    if kw["control_arm"] not in kw["arms"]:
        raise control.err("arm", f"{kw['control_arm']!r} is not one of the arms ({', '.join(kw['arms'])})")
    control.done()
    kw["groups"] = _groups(top, src, kw["arms"])
    kw["hypotheses"] = _hypotheses(top, src, kw["arms"], kw["control_arm"])
    top.done()
    return StudyConfig(**kw)


def _arms(top: _Reader, src: str) -> dict[str, Arm]:
    table = top.get("arms", dict)
    if not table:
        raise top.err("arms", "define at least one arm")
    arms = {}
    for name, t in table.items():
        r = _Reader(t, f"arms.{name}", src)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "as_is":
            raise StudyConfigError(f"{src}: arms.{name}: arm names are lowercase snake_case (and not as_is)")
        arms[name] = Arm(
            name,
            r.get("train_params", str, "all", check=lambda v: "" if v in ("all", "method") else "must be all or method"),
            r.get("objective", str, "flow", check=lambda v: "" if v in ("flow", "distill") else "must be flow or distill"),
            r.list_of("lrs", float, check=_positive),
        )
        r.done()
    return arms


def _groups(top: _Reader, src: str, arms: dict[str, Arm]) -> tuple[CellGroup, ...]:
    out = []
    for i, t in enumerate(top.get("cells", list)):
        r = _Reader(t, f"cells[{i}]", src)
        methods = select_methods(r.list_of("methods", str), lambda k, msg, r=r: r.err("methods" + k, msg))
        sparsities = r.list_of("sparsities", float, check=_sparsity)
        names = r.list_of("arms", str, check=lambda a: "" if a in arms else f"unknown arm {a!r} (arms: {', '.join(arms)})")
        r.done()
        out.append(CellGroup(methods, sparsities, names))
    if not out:
        raise top.err("cells", "define at least one [[cells]] group")
    return tuple(out)


def _hypotheses(top: _Reader, src: str, arms: dict[str, Arm], control_arm: str) -> tuple[Hypothesis, ...]:
    from salad_bench.methods import METHODS

    out, ids = [], set()
    for i, t in enumerate(top.get("hypotheses", list, [])):
        r = _Reader(t, f"hypotheses[{i}]", src)

        def method_name(v: str) -> str:
            return "" if v in METHODS else f"unknown method {v!r}"

        def metric_name(v: str) -> str:
            try:
                metric(v)
            except KeyError:
                return f"{v!r} is not a metric; choose from {', '.join(METRICS)} or <val_loss|velocity_mse>_band<j>"
            return ""

        hid = r.get("id", str)
        if hid in ids:
            raise r.err("id", f"{hid!r} is used twice")
        ids.add(hid)
        versus = r.get("versus", str, check=lambda v: "" if v == CONTROL else method_name(v))
        arm = r.get("arm", str, "ft", check=lambda a: "" if a in arms else f"unknown arm {a!r}")
        h = Hypothesis(
            id=hid,
            claim=r.get("claim", str),
            method=r.get("method", str, check=method_name),
            versus=versus,
            arm=arm,
            versus_arm=r.get("versus_arm", str, control_arm if versus == CONTROL else arm,
                             check=lambda a: "" if a in arms else f"unknown arm {a!r}"),
            sparsities=r.list_of("sparsities", float, check=_sparsity),
            metrics=r.list_of("metrics", str, check=metric_name),
            comparison=r.get("comparison", str, check=lambda v: "" if v in ("within", "better") else "must be within or better"),
            threshold=r.get("threshold", float, 0.0),
        )  # fmt: skip
        if h.comparison == "within":
            bad = [m for m in h.metrics if metric(m).better != "lower"]
            if bad:
                raise r.err("metrics", f"'within' compares a relative excess of a lower-is-better metric; not {bad[0]}")
        r.done()
        out.append(h)
    return tuple(out)
