"""The API reference is generated from the docstrings and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "make_api_docs.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docs_links_resolve():
    for page in list((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        text = page.read_text()
        for part in text.split("](")[1:]:
            target = part.split(")")[0].split("#")[0]
            if not target or target.startswith("http"):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_public_name_is_in_the_api_reference():
    import curvprune

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in curvprune.__all__
               if name != "__version__" and f"### `{name}`" not in text]
    assert not missing, f"add {missing} to SECTIONS in tools/make_api_docs.py"


# --------------------------------------------------------------------------------------------
# Every documented command runs as written
# --------------------------------------------------------------------------------------------

DOC_PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(page, line, argv)`` for every ``curvprune ...``, ``python3 -m curvprune...`` and
    ``python -m curvprune...`` command in a fenced block of README.md and docs/*.md, in page
    order (README first, then docs/ alphabetically). Comments are dropped and ``\\``
    continuations joined."""
    import shlex

    found = []
    for page in DOC_PAGES:
        fenced, pending = False, ""
        for line in page.read_text().splitlines():
            if line.lstrip().startswith("```"):
                fenced, pending = not fenced, ""
                continue
            if not fenced:
                continue
            line = pending + line
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:
                continue
            is_module = (len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m"
                         and argv[2].split(".")[0] == "curvprune")
            if argv[:1] == ["curvprune"] or is_module:
                found.append((page.name, line.strip(), argv))
    return found


def test_documented_commands_are_found_and_parse():
    """The fast check of every documented command: it is found, and its arguments parse (an
    unknown or renamed option fails here); the slow test below runs them."""
    import importlib

    from curvprune.cli import build_parser

    commands = [argv for _, _, argv in documented_commands()]
    assert ["python3", "-m", "curvprune.demo"] in commands
    assert any(argv[:2] == ["curvprune", "prune"] for argv in commands)
    assert any(argv[:2] == ["curvprune", "analyze"] for argv in commands)
    for argv in commands:
        if argv[0] == "curvprune":
            build_parser().parse_args(argv[1:])  # exits with status 2 on a bad option
        else:
            assert callable(getattr(importlib.import_module(argv[2]), "main", None)), argv


def _shrink(dataset, n: int):
    """The first ``n`` examples (a TensorDataset stays one, for the CLI's grey-to-RGB step)."""
    import torch

    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return torch.utils.data.TensorDataset(*(t[:n] for t in tensors))
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


def _write_assumed_state_dicts(argv: list[str]) -> None:
    import torch

    from curvprune.cli import load_model

    for flag in ("--weights", "--checkpoint"):
        if flag in argv[:-1] and "--model" in argv[:-1]:
            path = Path(argv[argv.index(flag) + 1])
            if not path.exists():
                model = load_model(argv[argv.index("--model") + 1])
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), path)


@pytest.mark.slow
def test_documented_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Each documented command is parsed as written and run to exit status 0, in order, in one
    folder (so ``--model model.pt`` finds the model the demo wrote). Quick mode: the datasets are
    cut to their first examples (the demo's to 10,000 training and 1,000 test examples, the
    command's to 2,000 and 500), nothing else changes. A state dict that a command assumes the
    user has (``--weights FILE`` or ``--checkpoint FILE`` not written by an earlier command) is
    written first from the ``--model`` architecture's own random weights."""
    import importlib

    from curvprune import data, demo
    from curvprune.cli import main

    if not any(data.FASHION_MNIST_DIR.glob("t10k-images-idx3-ubyte*")):
        pytest.skip("dataset-fashion-mnist not installed")
    real_load, real_sets = data.load_dataset, demo._datasets
    monkeypatch.setattr(data, "load_dataset", lambda spec, train=True, **kw: _shrink(
        real_load(spec, train=train, **kw), 2000 if train else 500))
    monkeypatch.setattr(demo, "_datasets", lambda: (lambda name, tr, te: (
        name, _shrink(tr, 10000), _shrink(te, 1000)))(*real_sets()))
    monkeypatch.chdir(tmp_path)
    failures = []
    for page, line, argv in documented_commands():
        _write_assumed_state_dicts(argv)
        try:
            if argv[0] == "curvprune":
                code = main(argv[1:])
            else:
                module = importlib.import_module(argv[2])
                code = module.main(argv[3:])
        except SystemExit as exc:
            code = exc.code
        except Exception as exc:  # noqa: BLE001 - reported with the command
            code = f"{type(exc).__name__}: {exc}"
        err = capsys.readouterr().err
        if code not in (0, None):
            failures.append(f"{page}: `{line}` -> {code} {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def _library_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "curvprune").rglob("*.py") if "__pycache__" not in p.parts)


def test_readme_layout_names_every_module():
    """Every module (``name``) and every package (``name/``) and its modules are named."""
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "curvprune"
    names = set()
    for path in _library_modules():
        parts = path.relative_to(package).with_suffix("").parts
        names.update(f"{d}/" for d in parts[:-1])  # a sub-package: `pruning/`
        if parts[-1] != "__init__":
            names.add(parts[-1])
    missing = sorted(m for m in names if f"`{m}`" not in layout)
    assert not missing, f"README's Layout section does not name {missing}"


def test_every_module_says_what_it_owns():
    """Each module opens with a docstring (the one sentence that says what it owns)."""
    import ast

    bare = [str(p.relative_to(ROOT)) for p in _library_modules()
            if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not bare, f"modules without a docstring: {bare}"


def test_no_stale_not_yet_available_statements():
    """Features that exist are not announced as missing (channel granularity, ...)."""
    stale = ("not yet available", "not provided yet", "does not provide yet", "provide yet")
    pages = DOC_PAGES + sorted((ROOT / "curvprune").glob("*.py"))
    found = [f"{p.name}: {s!r}" for p in pages for s in stale if s in p.read_text().lower()]
    assert not found, found
