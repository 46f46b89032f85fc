"""The docs cannot drift from the code: every command block marked for checking in README.md and
docs/*.md runs, and must exit 0.

Marking (documented in docs/README.md):

* a fenced block whose info string is ``bash check`` runs with ``bash -e -o pipefail``, in
  document order, in a copy of the repository (so outputs never land in the checkout);
* ``python check`` blocks of a page run together as one script, after the page's bash blocks;
* ``<!-- check-sub: OLD => NEW -->`` lines right above a checked block replace text before it
  runs (small sizes for a command shown at full size); OLD must occur in the block.

The example policy plugin is installed (``pip --target``) and on PYTHONPATH for every block, as
docs/extending.md tells readers to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_plugin_example import install_example

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHECKED = {"bash check": "bash", "python check": "python"}
_SUB = re.compile(r"^<!--\s*check-sub:\s*(.*?)\s*=>\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(`{3,})\s*(.*?)\s*$")
BLOCK_TIMEOUT_S = 300


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    info: str
    text: str
    subs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kind(self) -> str | None:
        return CHECKED.get(self.info)

    def runnable(self) -> str:
        text = self.text
        for old, new in self.subs:
            if old not in text:
                raise AssertionError(f"{self.where}: check-sub {old!r} does not occur in the block")
            text = text.replace(old, new)
        return text

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse(text: str, page: str) -> list[Block]:
    """Fenced blocks with their info strings and the check-sub lines right above them."""
    blocks: list[Block] = []
    lines = text.splitlines()
    pending: list[tuple[str, str]] = []
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        sub = _SUB.match(line)
        fence = _FENCE.match(line)
        if sub:
            if not pending:
                pending_line = i + 1
            pending.append((sub.group(1), sub.group(2)))
        elif fence:
            ticks, info = fence.groups()
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip() == ticks), None)
            if end is None:
                raise AssertionError(f"{page}:{i + 1}: unclosed code fence")
            block = Block(page, i + 1, info, "\n".join(lines[i + 1:end]) + "\n", pending)
            if pending and block.kind is None:
                raise AssertionError(f"{page}:{pending_line}: check-sub above a block that is "
                                     f"not checked ({info!r})")
            blocks.append(block)
            pending = []
            i = end
        elif pending and line.strip():
            raise AssertionError(f"{page}:{pending_line}: check-sub not directly above a block")
        i += 1
    if pending:
        raise AssertionError(f"{page}:{pending_line}: check-sub at the end of the page")
    return blocks


def page_blocks(path: Path) -> list[Block]:
    return parse(path.read_text(), str(path.relative_to(REPO)))


# ------------------------------------------------------------------ the parser's own contract
def test_parse_markers_and_substitutions():
    text = ("intro\n\n<!-- check-sub: --gen 256 => --gen 8 -->\n```bash check\n"
            "hgsim simulate --gen 256\n```\n\n```bash\npip install x\n```\n"
            "````python check\nprint('```')\n````\n")
    blocks = parse(text, "p.md")
    assert [(b.line, b.kind) for b in blocks] == [(4, "bash"), (8, None), (11, "python")]
    assert blocks[0].runnable() == "hgsim simulate --gen 8\n"
    assert blocks[2].text == "print('```')\n"


@pytest.mark.parametrize("text, message", [
    ("<!-- check-sub: a => b -->\n```bash\na\n```\n", "not checked"),
    ("<!-- check-sub: a => b -->\ntext\n```bash check\na\n```\n", "not directly above"),
    ("```bash check\nopen\n", "unclosed"),
])
def test_parse_rejects_stale_markers(text, message):
    with pytest.raises(AssertionError, match=message):
        parse(text, "p.md")


def test_substitution_must_match():
    block = parse("<!-- check-sub: --gen 256 => --gen 8 -->\n```bash check\nx\n```\n", "p.md")[0]
    with pytest.raises(AssertionError, match="does not occur"):
        block.runnable()


def test_readme_starts_with_the_two_setup_commands():
    """CI (.ci/run) runs the second; both must stay the README's first commands."""
    bash = [b for b in page_blocks(REPO / "README.md") if b.info.startswith("bash")]
    assert bash[0].text.strip() == ('python -m pip install -c constraints/cpu.txt -e ".[hw]" && '
                                   "python -m hgsim study studies/cxl_sweep.yaml")
    tests = ('python -m pip install -c constraints/cpu.txt -e ".[hw,dev]" && '
             "python -m pytest -q -n logical --dist loadfile")
    assert bash[1].text.strip() == tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()  # exactly what CI runs


def test_every_page_is_checked_somewhere():
    """A page with commands but no checked block has silently opted out."""
    for page in PAGES:
        blocks = page_blocks(page)
        commands = [b for b in blocks if b.info.split(" ")[0] in ("bash", "python")]
        if commands:
            assert any(b.kind for b in blocks), f"{page.name}: no block is marked for checking"


# ------------------------------------------------------------------ running them
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the repository to run in, and the environment: this interpreter first on
    PATH (``python`` is the test's), the example plugin installed."""
    root = tmp_path_factory.mktemp("docs-check")
    copy = root / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "results", "__pycache__", "build", "*.egg-info", ".pytest_cache",
        ".ruff_cache", ".hypothesis", "*.validation.*", "local.yaml", "local.calibration.*"))
    site = install_example(root / "plugin")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HGSIM_PROFILE_PATH", "HGSIM_MODEL_PATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(copy)])
    env["MPLBACKEND"] = "Agg"
    return copy, env


def _run(args: list[str], block: Block, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        pytest.fail(f"{block.where}: exit {result.returncode}\n--- block ---\n{args[-1]}\n"
                    f"--- output (tail) ---\n{tail}", pytrace=False)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_checked_blocks_run(page, workspace):
    copy, env = workspace
    blocks = [b for b in page_blocks(page) if b.kind]
    if not blocks:
        pytest.skip("no checked blocks")
    for block in (b for b in blocks if b.kind == "bash"):
        _run(["bash", "-e", "-o", "pipefail", "-c", block.runnable()], block, copy, env)
    python = [b for b in blocks if b.kind == "python"]
    if python:
        script = "\n".join(b.runnable() for b in python)
        _run([sys.executable, "-c", script], python[0], copy, env)


# ------------------------------------------------------------------ links, paths and counts
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_SECTION_REF = re.compile(r'([\w/-]+\.md), "([^"]+)"')
_REPO_PATH = re.compile(r"`((?:hgsim|hw_backend|studies|hardware_profiles|examples|benchmarks|"
                        r"docs|tests|constraints|\.ci)/[\w./\-]*)`")


def _prose(text: str) -> str:
    """The page without its fenced blocks (a ``# comment`` in a block is not a heading)."""
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m and (fence is None or line.strip() == fence):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            out.append(line)
    return "\n".join(out)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in _prose(page.read_text()).splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_links_and_named_paths_resolve(page):
    """Every relative link lands on a file (and heading) that exists, and every repository path
    the prose names in backticks exists: a moved file breaks this test, not a reader."""
    text = page.read_text()
    broken = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading #{frag} in {dest.name}")
    for name, heading in _SECTION_REF.findall(" ".join(text.split())):  # 'model.md, "Traces"'
        dest = next((d for d in (page.parent / name, REPO / "docs" / name) if d.exists()), None)
        if dest is None or not any(anchor(line.lstrip("#")).startswith(anchor(heading))
                                   for line in _prose(dest.read_text()).splitlines()
                                   if line.startswith("#")):
            broken.append(f'{name}, "{heading}": no such section')
    for path in _REPO_PATH.findall(text):
        if "<" not in path and not (REPO / path).exists() and not (page.parent / path).exists():
            broken.append(f"`{path}`: no such path")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_anchor_matches_github():
    assert anchor(" Energy and cost (hgsim/energy.py, hgsim/tco.py)") == \
        "energy-and-cost-hgsimenergypy-hgsimtcopy"
    assert anchor("A model of your own") == "a-model-of-your-own"


_SHIPPED = re.compile(r"`(\w+)` \(([^()]*?)(\d[\d,]*)\s+(points|searches|rows)\b([^,;)]*)"
                      r"|`(\w+)` \((\d+)[):]")  # or just the count: `scheduler_ablation` (40)


@pytest.mark.parametrize("page", ["README.md", "docs/studies.md"])
def test_shipped_study_sizes_match_their_files(page):
    """'`cxl_sweep` (270 points' and the like: each count quoted for a shipped study is what
    the study expands to (rows: every point; points as configured: those of the study as
    written, without its equal-accuracy twins)."""
    from hgsim.study.load import load_study

    quoted = [m for m in _SHIPPED.finditer((REPO / page).read_text())
              if (REPO / "studies" / f"{m.group(1) or m.group(6)}.yaml").exists()]
    assert len(quoted) >= 7, f"{page}: expected the shipped studies with their sizes"
    for m in quoted:
        name, count, unit, rest = (m.group(1), m.group(3), m.group(4), m.group(5)) if m.group(1) \
            else (m.group(6), m.group(7), "points", "")
        count = int(count.replace(",", ""))
        points = load_study(REPO / "studies" / f"{name}.yaml").expansion.points
        if "as configured" in rest:
            points = [p for p in points if p.coords.get("accuracy.target", "configured")
                      == "configured"]
        assert count == len(points), f"{page}: `{name}` quoted at {count} {unit}, " \
                                     f"expands to {len(points)}"


def test_studies_yaml_examples_validate(tmp_path):
    """docs/studies.md's schema example is a whole study and must load as written; each later
    fragment must load merged into it, with only the axes it refers to added (CXL latency and
    batch axes, two more policies, a `label.upgrade` zipped with the bandwidths; a search takes
    the context axis out, serving the context and batch axes, plots get the page's `derived`, a Pareto plot of `accuracy.target` its
    `equal_accuracy`). The schema example used to give a topk_ratio to every policy of a sweep
    that included FlexGen: an error."""
    import copy

    import yaml

    from hgsim.study.load import load_study

    blocks = [b for b in page_blocks(REPO / "docs" / "studies.md") if b.info == "yaml"]
    base = yaml.safe_load(blocks[0].text)
    fragments = [yaml.safe_load(b.text) for b in blocks[1:]]
    equal_accuracy = next(f for f in fragments if "equal_accuracy" in f)
    derived = next(f for f in fragments if "derived" in f)

    def load(study: dict, line: int) -> None:
        path = tmp_path / f"line{line}.yaml"
        path.write_text(yaml.safe_dump(study))
        try:
            load_study(path)  # raises ConfigError naming the file, line and key
        except Exception as exc:
            pytest.fail(f"docs/studies.md:{line}: {exc}", pytrace=False)

    load(base, blocks[0].line)
    for block, fragment in zip(blocks[1:], fragments, strict=True):
        study = copy.deepcopy(base)
        if "sweep" not in fragment:
            zipped, grid = study["sweep"][0]["zip"], study["sweep"][1]["grid"]
            zipped["label.upgrade"] = ["baseline", "x2", "x4", "x8"]
            grid["hardware.tiers.cxl0.latency_ns"] = [250, 400]
            grid["workload.batch"] = [1, 2]
            grid["policy"] = [*grid["policy"], "flexgen_cpu", "cpu_offload"]
            if "search" in fragment or "serving" in fragment:
                del grid["workload.context"]
            if "serving" in fragment:  # a server's lengths and batch are its own
                del grid["workload.batch"]
        study.update(fragment)
        if "plots" in fragment:
            study.update(derived)
        if any(p.get("kind") == "pareto" for p in fragment.get("plots", {}).values()):
            study.update(equal_accuracy)
        load(study, block.line)
