"""The README and docs/ render: well-formed markdown, links and cited files exist; the demo's
default outputs are git-ignored so running it leaves a clean checkout."""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
CITED_DIRS = ("results/", "experiments/", "colab/", "docs/", "lrjax/", "tests/")


def _read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def _outside_fences(text):
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return out


@pytest.mark.parametrize("page", PAGES)
def test_fences_closed(page):
    fences = [ln for ln in _read(page).split("\n") if ln.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{page}: an unclosed ``` block"


@pytest.mark.parametrize("page", PAGES)
def test_comment_markers_balanced(page):
    text = "\n".join(_outside_fences(_read(page)))
    depth = 0
    for tok in re.findall(r"<!--|-->", text):
        depth += 1 if tok == "<!--" else -1
        assert depth in (0, 1), f"{page}: '-->' without '<!--' or nested comment"
    assert depth == 0, f"{page}: '<!--' never closed"


@pytest.mark.parametrize("page", PAGES)
def test_headings_unique_and_clean(page):
    heads = [ln.strip() for ln in _outside_fences(_read(page)) if re.match(r"#{1,6} ", ln)]
    dup = {h for h in heads if heads.count(h) > 1}
    assert not dup, f"{page}: duplicated headings {dup}"
    for h in heads:
        assert h.count("`") % 2 == 0 and h.count('"') % 2 == 0, f"{page}: broken heading {h!r}"


@pytest.mark.parametrize("page", PAGES)
def test_tables_rectangular(page):
    lines = _outside_fences(_read(page))
    table = []
    for ln in lines + [""]:
        if ln.strip().startswith("|"):
            table.append(ln)
            continue
        if table:
            cols = [len(re.findall(r"(?<!\\)\|", r.replace("`|`", ""))) for r in table]
            assert len(set(cols)) == 1, f"{page}: table rows with different column counts:\n" + "\n".join(table)
            assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1].strip()), f"{page}: table without a separator row"
        table = []


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_exist(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    text = "\n".join(_outside_fences(_read(page)))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(base, target.split("#")[0]))
        assert os.path.exists(path), f"{page}: link to missing {target}"


@pytest.mark.parametrize("page", PAGES)
def test_cited_files_exist(page):
    text = "\n".join(_outside_fences(_read(page)))
    for tok in re.findall(r"`([^`\s]+)`", text):
        if not tok.startswith(CITED_DIRS) or "<" in tok or "{" in tok:
            continue
        assert glob.glob(os.path.join(ROOT, tok.rstrip("/"))), f"{page}: cites missing file {tok}"


def test_readme_first_block_is_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", _read("README.md"), re.S).group(1)
    cmds = [ln for ln in block.split("\n") if ln.strip() and not ln.strip().startswith("#")]
    assert len(cmds) == 2 and "quickstart.py" in cmds[0] and "pytest" in cmds[1]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert cmds[1].strip() in f.read(), ".ci/run must run the README's test command"


def _git_ignored(rel):
    r = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT, capture_output=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    return r.returncode == 0


@pytest.mark.parametrize("script", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))))
def test_experiment_default_output_is_git_ignored(script):
    with open(os.path.join(ROOT, "experiments", script)) as f:
        src = f.read()
    defaults = re.findall(r"add_argument\(\s*\"--out\"\s*,\s*default=\"([^\"]+)\"", src)
    for d in defaults:
        assert _git_ignored(os.path.join(d, "x.json")), f"{script}: default --out {d!r} is tracked by git"
