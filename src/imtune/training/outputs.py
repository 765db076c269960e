"""The run directory: config, metrics log (JSONL + the run trackers), checkpoints and the final model.

Every path a run writes is recorded in a manifest (`.imtune-manifest.json`, the one every command keeps: see
io_utils) before it is written, so that
`--overwrite` and the clean-up after a failed run remove exactly what imtune wrote and never anything else: an
output directory holding a file imtune did not write is refused by `--overwrite`, naming that file. Final files are
written to a temp name and renamed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import sys
from pathlib import Path

from imtune import io_utils
from imtune.config import TrainConfig
from imtune.errors import ImtuneError
from imtune.training import checkpointing, tracking

CONFIG_FILE = "imtune_config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_METRICS_FILE = "final_metrics.json"
MANIFEST = io_utils.MANIFEST
# What a failed run keeps when a checkpoint lets it be resumed (top-level names).
RESUME_STATE = (CONFIG_FILE, METRICS_FILE, *tracking.LOCAL_STATE, checkpointing.CHECKPOINTS)
# Names imtune gives its own temp files and dirs (an atomic write, a checkpoint or final save in progress): what a
# killed run leaves behind, and so imtune's to remove.
_TEMP = re.compile(r"^(\.tmp-checkpoint-\d+|\.tmp-final-\d+|\..+\.[a-z0-9_]{8}\.tmp)$")


def note(msg: str) -> None:
    print(f"imtune train: {msg}", file=sys.stderr, flush=True)


class RunDir:
    """A run's output directory and the manifest of every path imtune wrote in it (main process; on the other
    processes every method is a no-op)."""

    KINDS = ("files", "dirs", "trees")  # trees: directories written whole by imtune (a checkpoint)

    def __init__(self, out: str | Path, active: bool = True):
        self.out, self.active = Path(out), active
        self.manifest = self.out / MANIFEST
        self.owned: dict[str, set[str]] = {k: set() for k in self.KINDS}
        self.created: set[str] = set()  # paths this invocation created (what a failed run removes)
        self.created_root = False
        d = io_utils.read_manifest(self.out) if self.out.is_dir() else {}
        self.owned = {k: set(d.get(k, [])) for k in self.KINDS}

    # ---- before any work ------------------------------------------------------------------------------------------
    def check(self, cfg: TrainConfig) -> None:
        """Refuse, before any work, an output that would be written over: an input inside it, a non-empty directory
        without --overwrite/--resume, or a file imtune did not write (which --overwrite would have to remove)."""
        from imtune.io_utils import prepare_output

        prepare_output(self.out, (*cfg.data_paths(), cfg.val_data, cfg.model), kind="dir")
        if not self.out.is_dir() or not any(self.out.iterdir()):
            return
        if cfg.resume:
            if not self.manifest.is_file():
                raise ImtuneError(f"out: {self.out} has no {MANIFEST} (not written by imtune, or by an older "
                                  "version), so imtune will not write into it; resume into a new directory: "
                                  "--out NEW_DIR --resume CHECKPOINT")
            return
        if not cfg.overwrite:
            raise ImtuneError(f"out: {self.out} is not empty; pass --overwrite to replace it or --resume to continue")
        self._refuse_foreign("--overwrite")

    def _refuse_foreign(self, action: str) -> None:
        foreign = next((rel for rel, kind in self._walk() if kind == "foreign"), None)
        if foreign is not None:
            raise ImtuneError(f"out: refusing to {action} {self.out}: {self.out / foreign} was not written by imtune "
                              "(move it away, or choose another --out); nothing was removed")

    def _walk(self):
        """(relative path, kind) for everything in the directory; kind is one of KINDS, "temp" or "foreign"."""
        for root, dirs, files in os.walk(self.out):
            base = Path(root).relative_to(self.out)
            for name in sorted(files):
                rel = (base / name).as_posix()
                if rel != MANIFEST:
                    yield rel, ("files" if rel in self.owned["files"] else "temp" if _TEMP.match(name)
                                else "foreign")
            walk_into = []
            for name in sorted(dirs):
                rel = (base / name).as_posix()
                kind = next((k for k in ("trees", "dirs") if rel in self.owned[k]), None)
                kind = kind or ("temp" if _TEMP.match(name) else "files" if rel in self.owned["files"] else "foreign")
                if os.path.islink(self.out / rel):  # a link is one entry, never followed
                    kind = "files" if rel in self.owned["files"] else "foreign"
                yield rel, kind
                if kind == "dirs":
                    walk_into.append(name)
            dirs[:] = walk_into

    # ---- recording --------------------------------------------------------------------------------------------------
    def open(self, overwrite: bool) -> None:
        """Create the directory, or empty it of what imtune wrote there (--overwrite)."""
        if not self.active:
            return
        if overwrite and self.out.is_dir():
            self._refuse_foreign("--overwrite")  # again: minutes may have passed since `check`
            for rel, kind in sorted(self._walk(), key=lambda x: -x[0].count("/")):
                _remove(self.out / rel, kind)
            self.owned = {k: set() for k in self.KINDS}
        self.created_root = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self._save()

    def claim(self, rel: str, kind: str = "files") -> Path:
        """Record `rel` as imtune's before writing it; refuses a path that exists and was not written by imtune."""
        path = self.out / rel
        if not self.active:
            return path
        parents = [p.as_posix() for p in reversed(Path(rel).parents) if p != Path(".")]
        for r in [*(p for p in parents if p not in self.owned["dirs"]), rel]:
            k = kind if r == rel else "dirs"
            exists = os.path.lexists(self.out / r)
            if exists and r not in self.owned[k]:
                raise ImtuneError(f"{self.out / r} exists and was not written by imtune; imtune will not replace "
                                  "it (move it away, or choose another --out)")
            if not exists:
                self.created.add(r)
            self.owned[k].add(r)
        self._save()
        return path

    def adopt_new(self, rel_dir: str, before: set[str]) -> None:
        """Record the files that appeared in `rel_dir` since `before` (its listing then) as written by imtune."""
        if self.active:
            new = {(Path(rel_dir) / n).as_posix() for n in os.listdir(self.out / rel_dir)} - before
            self.owned["files"] |= new
            self.created |= new
            self._save()

    def listing(self, rel_dir: str) -> set[str]:
        d = self.out / rel_dir
        return {(Path(rel_dir) / n).as_posix() for n in os.listdir(d)} if d.is_dir() else set()

    def forget_missing(self) -> None:
        """Drop entries whose path is gone (checkpoints pruned by `save_total_limit`)."""
        if self.active:
            for k in self.KINDS:
                self.owned[k] = {r for r in self.owned[k] if os.path.lexists(self.out / r)}
            self._save()

    def _save(self) -> None:
        io_utils.write_manifest(self.out, {k: sorted(v) for k, v in self.owned.items()})

    # ---- after a failure --------------------------------------------------------------------------------------------
    def clean_up_failed(self) -> Path | None:
        """Remove what this invocation created. When a complete checkpoint exists, the run can be resumed: keep
        it with the config and metrics it needs, and return it."""
        if not self.active or not self.out.is_dir():
            return None
        good = checkpointing.list_checkpoints(self.out)
        keep = RESUME_STATE if good else ()
        for rel in sorted(self.created, key=lambda r: -r.count("/")):
            if rel.split("/")[0] not in keep:
                kind = next((k for k in self.KINDS if rel in self.owned[k]), "files")
                _remove(self.out / rel, kind)
        for rel, kind in list(self._walk()):
            if kind == "temp":
                _remove(self.out / rel, kind)
        self.forget_missing()
        if not any(self.owned.values()):
            self.manifest.unlink(missing_ok=True)
            if self.created_root and not any(self.out.iterdir()):
                self.out.rmdir()
        return good[-1] if good else None


def _remove(path: Path, kind: str) -> None:
    if kind == "foreign":
        raise AssertionError(f"refusing to remove {path}")  # pragma: no cover - callers check first
    if kind in ("trees", "temp") and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif kind == "dirs":
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty: whatever is left in it is not imtune's to remove
    else:
        path.unlink(missing_ok=True)


def saved_config(cfg: TrainConfig) -> dict:
    # resume/overwrite describe one invocation, not the run: re-using the file should start a run, not resume one.
    return cfg.replace(resume=None, overwrite=False).to_dict()


def save_final(cfg: TrainConfig, run_dir: RunDir, model, tokenizer, accelerator, card: str, sharded: bool,
               chat_template: str | None) -> None:
    """Write model, tokenizer and card to a temp dir, then rename the files into the run directory (config.json
    and README last, so a directory that looks loadable is complete). Refuses non-finite weights."""
    from imtune.training import distributed
    from imtune.training.health import all_finite

    adapter_only = cfg.lora and not cfg.merge
    full = distributed.full_state_dict(accelerator, model, adapter_only) if sharded else None  # every process
    if not accelerator.is_main_process:
        return
    from imtune.io_utils import atomic_write_text

    out = run_dir.out
    unwrapped = distributed.unsharded_copy(model, full, adapter_only) if sharded else accelerator.unwrap_model(model)
    tmp = out / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if cfg.lora and cfg.merge:
            unwrapped = unwrapped.merge_and_unload()
        if not all_finite(unwrapped.parameters()):
            raise ImtuneError("the final weights are not finite (inf/NaN); nothing was saved")
        if hasattr(unwrapped, "config"):
            unwrapped.config.use_cache = True
        unwrapped.save_pretrained(str(tmp), safe_serialization=True)
        tok = copy.copy(tokenizer)  # load_tokenizer memoises: never mutate the shared instance
        if chat_template:
            tok.chat_template = chat_template
        tok.save_pretrained(str(tmp))
        names = sorted(p.name for p in tmp.iterdir())
        last = [n for n in ("adapter_config.json", "config.json") if n in names]
        for n in [*names, "README.md"]:  # every name first: a foreign file stops the save before any replace
            run_dir.claim(n)
        io_utils.fsync_tree(tmp)  # on disk before the renames that make it the run's model
        for n in [n for n in names if n not in last] + last:
            os.replace(tmp / n, out / n)
    except Exception as e:  # a full disk: one line, and the failed run removes what it wrote
        reason = io_utils.write_error_reason(e)
        if reason is None:
            raise
        raise ImtuneError(f"cannot write the final model into {out}: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(out / "README.md", card)


class MetricsLog:
    """metrics.jsonl + the trackers of `cfg.report_to` (training.tracking), main process only."""

    def __init__(self, run_dir: RunDir, keep_rows: int | None, purge_step: int | None,
                 resumed_from: Path | None = None, cfg: TrainConfig | None = None):
        """`keep_rows`/`resumed_from`: a resumed run keeps the rows written up to its checkpoint, taken from the
        checkpoint's own run directory when it resumes into another one. `cfg`: the resolved config, logged to its
        trackers (none without it)."""
        self.active, self.rows = run_dir.active, []
        self.f, self.trackers = None, []
        if not self.active:
            return
        from imtune.io_utils import atomic_write_text

        self.path = run_dir.claim(METRICS_FILE)
        source = self.path if self.path.exists() or resumed_from is None else resumed_from / METRICS_FILE
        if keep_rows is not None and source.exists():
            # Rows written after the checkpoint belong to the part of the run that is being redone.
            lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_rows]
            atomic_write_text(self.path, "".join(lines))
            self.rows = [json.loads(x) for x in lines]
        if cfg is not None:
            self.trackers = tracking.open_trackers(cfg, saved_config(cfg), run_dir, purge_step, resumed_from, note)
        self.f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.active:
            return
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        for t in list(self.trackers):
            try:
                t.log_step(row)
            except Exception as e:  # a tracker that breaks mid-run (a server gone) must not cost the training
                note(f"warning: {t.name} failed ({tracking.error_text(t, e)}); not logging to it any more")
                self.trackers.remove(t)

    def close(self) -> None:
        """Close metrics.jsonl; the trackers stay open for the final summary (`finish`)."""
        if self.f:
            self.f.close()
        self.f = None

    def finish(self, summary: dict | None = None, failed: bool = False) -> None:
        """Give the trackers the final metrics and end their runs (as failed after an error); idempotent."""
        self.close()
        trackers, self.trackers = self.trackers, []
        tracking.finish_all(trackers, summary, failed, note)


def config_yaml(d: dict) -> str:
    import yaml

    return "# Resolved imtune training config: `imtune train THIS_FILE --out NEW_DIR` repeats the run.\n" + \
        yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
