"""What ``--resume`` must match: the seed, the data, the N:M pattern and the base model of the checkpoint.

A checkpoint continues one trajectory. Resuming it with another seed (another data order and other
mask draws), other samples, another pattern or another base model silently mixes two runs, so each
difference is an error naming both values. ``--resume-allow-mismatch=seed,data,base`` continues
anyway, for the ones named (say, a base re-saved in another file layout, or data extended on
purpose). The pattern cannot be overridden: the logits would mean something else. These checks run
before the model is loaded and before anything in the run directory is written, so a refused resume
leaves the directory exactly as it was.

The seed and the data identity (the samples' fingerprint and their number) are kept in the trainer
state of every checkpoint; checkpoints written before they were recorded are checked for what they
hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskpro_ds.formats.checkpoint_format import MANIFEST, Manifest

ALLOWABLE = ("seed", "data", "base")


class ResumeMismatch(ValueError):
    """The checkpoint does not belong to this run's settings; the message lists every difference."""


@dataclass(frozen=True)
class RunIdentity:
    seed: int
    data_fingerprint: str
    num_samples: int
    n: int
    m: int
    base_fingerprint: str | None

    def state(self) -> dict:
        """What the trainer stores in each checkpoint's state for the next resume to compare."""
        return {"seed": self.seed, "data": {"fingerprint": self.data_fingerprint, "num_samples": self.num_samples}}


def parse_allowed(text: str | None) -> frozenset[str]:
    """``"seed,data"`` -> {"seed", "data"}; an unknown name is an error naming the flag."""
    names = {part.strip() for part in (text or "").split(",") if part.strip()}
    unknown = sorted(names - set(ALLOWABLE))
    if unknown:
        raise ValueError(f"--resume-allow-mismatch: unknown {', '.join(unknown)}; choose among {', '.join(ALLOWABLE)} "
                         "(the pattern cannot be overridden)")
    return frozenset(names)


def _short(fingerprint: str | None) -> str:
    return f"{fingerprint[:16]}…" if fingerprint else "none recorded"


def check_resume(manifest: Manifest, ours: RunIdentity, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Raise :class:`ResumeMismatch` unless ``manifest`` matches ``ours`` (or the differences are
    allowed); returns one warning per allowed difference, for the caller to log."""
    where = manifest.path / MANIFEST
    differences: list[tuple[str, str]] = []
    if (manifest.n, manifest.m) != (ours.n, ours.m):
        differences.append(("pattern", f"the checkpoint's logits are {manifest.n}:{manifest.m}, mask.pattern is "
                                       f"{ours.n}:{ours.m} (this one cannot be overridden)"))
    seed = manifest.state.get("seed")
    if seed is not None and int(seed) != ours.seed:
        differences.append(("seed", f"the checkpoint was trained with train.seed={seed}, this run has "
                                    f"train.seed={ours.seed} (the data order and every mask draw follow the seed)"))
    data = manifest.state.get("data")
    if data is not None and (data.get("fingerprint"), int(data.get("num_samples", -1))) != (
            ours.data_fingerprint, ours.num_samples):
        source = manifest.config.get("data", {}).get("source", "?")
        differences.append(("data", f"the checkpoint was trained on {data.get('num_samples')} samples of {source} "
                                    f"(fingerprint {_short(data.get('fingerprint'))}), this run has {ours.num_samples} "
                                    f"samples (fingerprint {_short(ours.data_fingerprint)}); data.source, the "
                                    "tokenizer, data.seqlen, data.text_field, data.max_documents and "
                                    "data.num_samples decide them"))
    if manifest.base_fingerprint and ours.base_fingerprint and manifest.base_fingerprint != ours.base_fingerprint:
        differences.append(("base", f"the checkpoint was made from base model fingerprint "
                                    f"{_short(manifest.base_fingerprint)}, model.path has "
                                    f"{_short(ours.base_fingerprint)}"))
    refused = [(name, why) for name, why in differences if name not in allowed or name == "pattern"]
    if refused:
        lines = "\n".join(f"  - {name}: {why}" for name, why in refused)
        overridable = [name for name, _ in refused if name != "pattern"]
        hint = (f", or pass --resume-allow-mismatch={','.join(overridable)} to continue anyway" if overridable else "")
        raise ResumeMismatch(
            f"--resume: {manifest.path} does not match this run:\n{lines}\nResuming would mix two runs; nothing "
            f"was changed. Use the checkpoint's settings (its config is in {where}) or another train.run_dir{hint}")
    return [f"--resume-allow-mismatch={name}: {why}; continuing as asked" for name, why in differences]
