"""The bench's plan: which rows run and roughly how long each takes, from the committed run of the same model.

Before the first row the bench prints every row with its estimate and the total; after each row, the elapsed
time and the estimated remainder. Estimates scale a committed run's per-row phase times (`bench/published/`,
`phase_s`) by the work asked (samples x steps, calibration trajectories, calibration seeds) and by this
machine's speed, measured on the FP32 reference both runs sample first. Rows without a committed time get the
median of the committed rows of their method family, else of all rows. They are estimates: a learned row's time
depends on the CPU, and on whatever else runs on it.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PUBLISHED = Path(__file__).resolve().parent / "published"


def reference_run(model: str, published: Path = PUBLISHED, compiled: bool = True) -> Optional[dict]:
    """The committed full bench run (`results.json` with rows and `meta.setup_s`) of `model` to estimate from: one
    that compiled as asked if there is one, the newest among those; None without a committed run of `model`."""
    runs = []
    for path in sorted(published.glob("*/results.json")):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        if meta.get("model") == model and "setup_s" in meta and not meta.get("quick") and data.get("rows"):
            runs.append((meta.get("compiled", True) == compiled, meta.get("date", ""), path.parent.name, data))
    return max(runs, key=lambda r: r[:3])[3] if runs else None


def _work(meta: dict) -> float:
    return float(meta["num_samples"]) * float(meta["steps"])


@dataclass
class Plan:
    """Row estimates in seconds on the reference machine, and this machine's speed relative to it.

    Attributes:
        estimates: row name -> seconds on the reference machine (None: no reference run).
        reference: the reference run's directory name, or None.
        speed: this machine's time over the reference's on the same work (1 until `calibrate_speed`).
        done: row name -> measured seconds.
    """

    estimates: dict[str, Optional[float]]
    reference: Optional[str] = None
    reference_meta: Optional[dict] = None
    speed: float = 1.0
    done: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_rows(cls, rows, args, published: Path = PUBLISHED) -> "Plan":
        """Estimates for the bench's `rows` under its parsed `args` (`num_samples`, `steps`, `calib_samples`,
        `calib_seeds`, `no_compile`)."""
        ref = reference_run(args.model, published, compiled=not args.no_compile)
        if ref is None:
            return cls({r.name: None for r in rows})
        meta = ref["meta"]
        sampling_scale = args.num_samples * args.steps / _work(meta)
        calib_scale = args.calib_samples / float(meta["calib_samples"])
        by_name = {row["name"]: row for row in ref["rows"]}

        def cost(row: dict) -> float:
            phases = row.get("phase_s") or {}
            quantize = phases.get("quantize", 0.0) * calib_scale
            compile_s = 0.0 if args.no_compile else phases.get("compile", 0.0)
            sampling = phases.get("sampling", 0.0) * sampling_scale
            return (quantize + compile_s + sampling) * args.calib_seeds + phases.get("heldout", 0.0)

        families: dict[str, list[float]] = {}
        for row in ref["rows"]:
            if row.get("phase_s"):
                families.setdefault(row["method"], []).append(cost(row))
        everything = [c for costs in families.values() for c in costs]
        estimates = {}
        for spec in rows:
            if spec.is_reference:
                estimates[spec.name] = 0.0  # sampled before the rows (setup)
            elif spec.name in by_name and by_name[spec.name].get("phase_s"):
                estimates[spec.name] = cost(by_name[spec.name])
            else:
                pool = families.get(spec.method) or everything
                estimates[spec.name] = statistics.median(pool) if pool else None
        return cls(estimates, reference=meta.get("run_name"), reference_meta=meta)

    def calibrate_speed(self, fp_reference_s: float, args) -> None:
        """Sets `speed` from the FP32 reference phase (sampling 2 x num_samples FP images, the same work in both
        runs up to the samples x steps ratio)."""
        if self.reference_meta is None:
            return
        ref_s = (self.reference_meta.get("setup_s") or {}).get("fp32_reference")  # None: a run that lost it
        if ref_s:
            self.speed = fp_reference_s / (ref_s * args.num_samples * args.steps / _work(self.reference_meta))

    def total_s(self) -> Optional[float]:
        if any(v is None for v in self.estimates.values()):
            return None
        return sum(self.estimates.values()) * self.speed

    def remaining_s(self) -> Optional[float]:
        """Estimated seconds for the rows not done yet, corrected by how the finished rows compared with their
        estimates."""
        left = [v for name, v in self.estimates.items() if name not in self.done]
        if any(v is None for v in left):
            return None
        finished = [(self.done[n], self.estimates[n] * self.speed) for n in self.done if self.estimates[n]]
        drift = sum(d for d, _ in finished) / sum(e for _, e in finished) if finished else 1.0
        return sum(left) * self.speed * drift

    def lines(self) -> list[str]:
        """The plan as printable lines."""
        source = (f"estimates from bench/published/{self.reference}, x{self.speed:.2f} for this machine"
                  if self.reference else "no committed run of this model: no time estimates")
        out = [f"[bench] plan ({source}):"]
        for name, est in self.estimates.items():
            out.append(f"[bench]   {name:<24} {'-' if est is None else format_s(est * self.speed)}")
        total = self.total_s()
        if total is not None:
            out.append(f"[bench]   {'rows in total':<24} {format_s(total)} (plus the FP32 reference and latency)")
        return out


def format_s(seconds: float) -> str:
    """E.g. 75 -> "1:15", 3700 -> "1:01:40"."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
