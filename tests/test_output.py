"""--out safety: never replace the input, a directory holding it or the working directory; check writability
up front; clean the temporaries of killed runs. Every case runs through the CLI on a copy of a shipped sample."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sublora_cli.formats.peft
import sublora_cli.pipeline.output
import sublora_cli.pipeline.spectra
import sublora_cli.pipeline.write
from sublora_cli.pipeline.output import atomic_output_dir

SAMPLE = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "elliptic" / "adapter_k2"
PRUNE = ("prune", "--budget", "50")  # data-free: the refusals are what is tested, not the selection


def make_tree(root: Path) -> Path:
    """root/p/adapter (a copy of the sample), root/p/notes.txt and root/other.txt; returns the adapter."""
    adapter = root / "p" / "adapter"
    shutil.copytree(SAMPLE, adapter)
    (root / "p" / "notes.txt").write_text("notes")
    (root / "other.txt").write_text("other")
    return adapter


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def prune(run_cli, adapter: Path, out: str | Path, *extra: str):
    return run_cli(PRUNE[0], adapter, *PRUNE[1:], "--out", out, *extra)


def assert_refused(result, needle: str) -> None:
    assert result.code == 1, (result.stdout, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr + result.stdout


@pytest.fixture
def adapter(tmp_path) -> Path:
    return make_tree(tmp_path)


@pytest.fixture
def no_computation(monkeypatch):
    """Make the first computing stage fail loudly, so a refusal proves it came before the work."""

    def computing(*_args, **_kwargs):
        raise AssertionError("the output check must come before any computation")

    monkeypatch.setattr(sublora_cli.pipeline.spectra, "adapter_spectra", computing)


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_out_containing_the_input_is_refused(tmp_path, adapter, run_cli, no_computation, overwrite):
    """Issue 9.1: `--out p --overwrite` with the input at p/adapter deleted p/adapter and p/notes.txt."""
    before = tree_hashes(tmp_path)
    assert_refused(prune(run_cli, adapter, tmp_path / "p", *overwrite), "contains the input adapter")
    assert tree_hashes(tmp_path) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("spelling", ["{p}/adapter/..", "{p}/adapter/../..", "{link}", "{link}/adapter/.."])
def test_out_containing_the_input_is_refused_through_dotdot_and_symlinks(tmp_path, adapter, run_cli, spelling):
    (tmp_path / "link").symlink_to(tmp_path / "p")
    out = spelling.format(p=tmp_path / "p", link=tmp_path / "link")
    before = tree_hashes(tmp_path)
    assert_refused(prune(run_cli, adapter, out, "--overwrite"), "contains the input adapter")
    assert tree_hashes(tmp_path) == before


def test_out_as_absolute_working_directory_containing_the_input(tmp_path, adapter, run_cli, monkeypatch):
    """Issue 9.1: `cd p && sublora prune adapter --out "$PWD" --overwrite` deleted the input."""
    monkeypatch.chdir(tmp_path / "p")
    before = tree_hashes(tmp_path)
    assert_refused(prune(run_cli, Path("adapter"), str(tmp_path / "p"), "--overwrite"), "contains the input")
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize(
    ("out", "needle"), [(".", "working directory"), ("..", "working directory"), ("/", "contains the input")]
)
def test_working_directory_and_its_ancestors_are_refused_up_front(
    tmp_path, adapter, run_cli, monkeypatch, no_computation, out, needle
):
    """Issue 9.1: `--out .` / `--out /` failed with EBUSY after the work and left a `..tmp-PID` adapter."""
    work = tmp_path / "elsewhere" / "work"  # holds no input: the refusal is about the working directory
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    outside_input = make_tree(tmp_path / "input_root")
    before = tree_hashes(tmp_path)
    assert_refused(prune(run_cli, outside_input, out, "--overwrite"), needle)
    assert tree_hashes(tmp_path) == before and not leftovers(tmp_path)
    assert not list(Path("/").glob("..tmp-*"))
    assert adapter.exists()


def test_out_under_a_file_is_refused_before_the_work(tmp_path, adapter, run_cli, no_computation):
    """Issue 9.8, as root can see it: a parent that cannot hold a directory is named, not the temp path."""
    (tmp_path / "file").write_text("x")
    result = prune(run_cli, adapter, tmp_path / "file" / "sub" / "out")
    assert_refused(result, f"{tmp_path / 'file'} is a file, not a directory")
    assert ".tmp-" not in result.stderr


def test_read_only_parent_is_refused_before_the_work(tmp_path, adapter, run_cli, no_computation):
    """Issue 9.8: a read-only parent failed after the work, naming `.out.tmp-PID`."""
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("permission bits do not bind this user (root): it really can write there")
        result = prune(run_cli, adapter, parent / "out")
    finally:
        parent.chmod(0o755)
    assert_refused(result, f"no write permission in {parent}")
    assert ".tmp-" not in result.stderr


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path, adapter, run_cli):
    """Issue 9.8: kill -9 during the write leaves `.out.tmp-PID` / `.out.old-PID`; the next run removes them."""
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f".out.tmp-{dead}", tmp_path / f".out.old-{dead}"]
    kept = [tmp_path / f".out.tmp-{alive}", tmp_path / f".other.tmp-{dead}", tmp_path / f".out.tmp-{dead}x"]
    for directory in stale + kept:
        directory.mkdir()
        (directory / "partial.safetensors").write_text("half")
    result = prune(run_cli, adapter, tmp_path / "out")
    assert result.code == 0, result.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not any(d.exists() for d in stale)
    assert all((d / "partial.safetensors").read_text() == "half" for d in kept)


LOCATIONS = ["input", "parent", "ancestor", "sibling", "existing_sibling", "inside", "cwd", "root"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    location=st.sampled_from(LOCATIONS),
    cwd=st.sampled_from(["top", "p", "adapter", "work"]),
    overwrite=st.booleans(),
    relative=st.booleans(),
)
def test_input_and_everything_outside_out_survive_any_out(run_cli, monkeypatch, location, cwd, overwrite, relative):
    """Issue 9 property: whatever --out is, the input and every file outside --out are byte-identical after."""
    with tempfile.TemporaryDirectory() as sandbox, monkeypatch.context() as patch:
        top = Path(sandbox).resolve() / "top"
        adapter = make_tree(top)
        (top / "work").mkdir()
        (top / "existing_sibling").mkdir()
        (top / "existing_sibling" / "old.txt").write_text("old")
        workdir = {"top": top, "p": top / "p", "adapter": adapter, "work": top / "work"}[cwd]
        patch.chdir(workdir)
        out = {
            "input": adapter,
            "parent": top / "p",
            "ancestor": top,
            "sibling": top / "p" / "pruned",
            "existing_sibling": top / "existing_sibling",
            "inside": adapter / "sub",
            "cwd": workdir,
            "root": Path("/"),
        }[location]
        patch.setattr(sublora_cli.pipeline.write, "atomic_output_dir", sandboxed_writer(top))
        before = tree_hashes(top)
        result = prune(run_cli, adapter, os.path.relpath(out) if relative else out, *(["--overwrite"] * overwrite))
        resolved = out.resolve()
        outside = {k: v for k, v in before.items() if not (top / k).resolve().is_relative_to(resolved)}
        after = tree_hashes(top)
        assert {k: after.get(k) for k in outside} == outside
        assert not leftovers(top)
        writable = location == "sibling" or (location == "existing_sibling" and overwrite)
        assert result.code == (0 if writable else 1), (out, workdir, result.stderr)


def sandboxed_writer(top: Path):
    """atomic_output_dir that fails the test instead of writing anywhere outside the sandbox."""

    def writer(out_dir: Path):
        assert out_dir.resolve().is_relative_to(top) and out_dir.resolve() != top, f"would write {out_dir}"
        return atomic_output_dir(out_dir)

    return writer


READ_LOCATIONS = [
    "calib_dir", "calib_file", "link_to_calib", "link_to_calib_dir", "config_dir", "config_file",
    "beside_calib", "below_calib_dir", "loop", "below_loop", "link_to_other", "sibling",
]  # fmt: skip
REACHED = "the calibration script was reached"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(location=st.sampled_from(READ_LOCATIONS), overwrite=st.booleans(), relative=st.booleans())
def test_files_the_run_reads_survive_any_out(run_cli, monkeypatch, location, overwrite, relative):
    """Issue 21 property: `--out dir --overwrite` deleted the calibration script in dir (and the --config file's
    folder). Whatever --out is — those files, their folders, symlinks to them, symlink loops — every file outside
    --out is byte-identical after, and no temporaries are left. The script stops the run as soon as it is imported,
    so a run that gets past the output check says so (REACHED) and writes nothing."""
    with tempfile.TemporaryDirectory() as sandbox, monkeypatch.context() as patch:
        top = Path(sandbox).resolve() / "top"
        adapter = make_tree(top)
        (top / "s").mkdir()
        (top / "s" / "calib.py").write_text(f"raise RuntimeError({REACHED!r})\n")
        (top / "c").mkdir()
        (top / "c" / "sublora.yaml").write_text("calib: ../s/calib.py\nmethod: magnitude\n")
        (top / "other").mkdir()
        (top / "other" / "keep.txt").write_text("keep")
        for link, target in [("link_calib", "s/calib.py"), ("link_s", "s"), ("loop", "loop"), ("link_o", "other")]:
            (top / link).symlink_to(top / target)
        patch.chdir(top / "p")
        out = {
            "calib_dir": top / "s",
            "calib_file": top / "s" / "calib.py",
            "link_to_calib": top / "link_calib",
            "link_to_calib_dir": top / "link_s",
            "config_dir": top / "c",
            "config_file": top / "c" / "sublora.yaml",
            "beside_calib": top / "s" / "out",
            "below_calib_dir": top / "link_s" / "sub" / "out",
            "loop": top / "loop",
            "below_loop": top / "loop" / "out",
            "link_to_other": top / "link_o",
            "sibling": top / "p" / "pruned",
        }[location]
        patch.setattr(sublora_cli.pipeline.write, "atomic_output_dir", sandboxed_writer(top))
        before = tree_hashes(top)
        spelled = os.path.relpath(out) if relative else out
        result = run_cli(
            "prune", adapter, "--config", top / "c" / "sublora.yaml", "--budget", "50", "--out", spelled,
            *(["--overwrite"] * overwrite),
        )  # fmt: skip
        assert tree_hashes(top) == before and not leftovers(top), (location, result.stderr)
        assert all((top / link).is_symlink() for link in ("link_calib", "link_s", "loop", "link_o"))
        reached = location in ("beside_calib", "below_calib_dir", "sibling")
        assert result.code == 1 and (REACHED in result.stderr) == reached, (location, result.stderr)
        assert "unexpected" not in result.stderr and (reached or "Traceback" not in result.stderr)


def test_a_symlinked_out_is_refused_and_names_its_target(tmp_path, adapter, run_cli, no_computation):
    """Issue 21: `--out LINK --overwrite` replaced the contents of the unrelated directory LINK points to."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "other")
    before = tree_hashes(tmp_path)
    result = prune(run_cli, adapter, tmp_path / "link", "--overwrite")
    assert_refused(result, "is a symbolic link")
    assert f"--out {tmp_path / 'other'}" in result.stderr  # the fix: give the target itself
    assert tree_hashes(tmp_path) == before


def test_a_second_run_into_the_same_out_is_refused_while_the_first_works(tmp_path, adapter, run_cli):
    """Issue 21: two runs into one new --out both said they wrote it; the later silently replaced the earlier."""
    out = tmp_path / "out"
    hold = "import sys, time; from pathlib import Path; from sublora_cli.pipeline.output import lock_output_dir\n" \
        "lock_output_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_refused(prune(run_cli, adapter, out), f"is being written by another sublora run (process {holder.pid})")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert prune(run_cli, adapter, out).code == 0  # the kernel released the dead holder's lock
    assert not sublora_cli.pipeline.output._lock_path(out.resolve()).exists()  # released and removed


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_a_full_disk_is_named_and_the_previous_output_is_intact(tmp_path, adapter, run_cli, monkeypatch, failure):
    """Issue 21: ENOSPC while writing was an "unexpected" SafetensorError / OSError."""
    import errno

    from safetensors import SafetensorError

    out = tmp_path / "out"
    assert prune(run_cli, adapter, out).code == 0
    previous = tree_hashes(out)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(sublora_cli.formats.peft, "save_file", full_disk)
    result = prune(run_cli, adapter, out, "--overwrite")
    assert_refused(result, f"Writing --out {out} failed")
    assert "No space left on device" in result.stderr and "The previous output" in result.stderr
    assert "is intact" in " ".join(result.stderr.split())
    assert tree_hashes(out) == previous and not leftovers(tmp_path)
    result = prune(run_cli, adapter, tmp_path / "new")
    assert_refused(result, "Nothing was written")
    assert not (tmp_path / "new").exists() and not leftovers(tmp_path)
