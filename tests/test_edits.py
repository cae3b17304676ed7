"""Edit parsing and application: SEARCH/REPLACE blocks and unified diffs (git apply), all-or-nothing."""

import subprocess
from pathlib import Path

import pytest

from agent.edit.apply import apply_edit
from agent.edit.fingerprint import edit_fingerprint, normalized_diff, tree_fingerprint
from agent.edit.parse import EditError, parse_edit

TRAIN_PY = """\
import torch


def step(model, batch):
    loss = model(batch)
    loss.backward()
    return loss


def lr_at(step, total):
    warmup = 10
    if step < warmup:
        return step / warmup
    return 1.0 - step / total
"""


def block(path: str, search: str, replace: str) -> str:
    return f"{path}\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit holding nanomodel/train.py and README.md."""
    root = tmp_path / "repo"
    (root / "nanomodel").mkdir(parents=True)
    (root / "nanomodel" / "train.py").write_text(TRAIN_PY)
    (root / "README.md").write_text("# tiny\n\nA tiny model.\n")
    git(root, "init", "-q")
    git(root, "config", "user.name", "Test")
    git(root, "config", "user.email", "test@example.com")
    git(root, "add", ".")
    git(root, "commit", "-qm", "init")
    return root


def git_diff_of(repo: Path, change) -> str:
    """`git diff` of what change(repo) does to the working tree, which is then put back to HEAD."""
    change(repo)
    git(repo, "add", "-A")
    diff = git(repo, "diff", "--cached", "-M", "HEAD")
    git(repo, "reset", "-q", "--hard", "HEAD")
    return diff


# --- parsing -----------------------------------------------------------------------------------------

def test_parse_reads_hypothesis_rationale_and_body():
    text = ("HYPOTHESIS: a shorter warmup trains faster\n"
            "RATIONALE: ten warmup steps are wasted at this size;\n"
            "five are enough.\n\n"
            + block("nanomodel/train.py", "    warmup = 10\n", "    warmup = 5\n"))
    edit = parse_edit(text)
    assert edit.format == "search_replace"
    assert edit.hypothesis == "a shorter warmup trains faster"
    assert edit.rationale == "ten warmup steps are wasted at this size;\nfive are enough."
    assert edit.body.startswith("nanomodel/train.py\n<<<<<<< SEARCH")
    assert edit.paths() == ["nanomodel/train.py"]


def test_parse_without_header_leaves_hypothesis_and_rationale_empty():
    edit = parse_edit(block("nanomodel/train.py", "    warmup = 10\n", "    warmup = 5\n"))
    assert (edit.hypothesis, edit.rationale) == ("", "")
    assert edit.paths() == ["nanomodel/train.py"]


@pytest.mark.parametrize("text", [
    # path on the line before the fence
    "**Hypothesis:** shorter warmup\n\nnanomodel/train.py\n```python\n<<<<<<< SEARCH\n    warmup = 10\n"
    "=======\n    warmup = 5\n>>>>>>> REPLACE\n```\n",
    # path inside the fence, in backticks, followed by prose after the fence
    "HYPOTHESIS: shorter warmup\n```python\n`nanomodel/train.py`\n<<<<<<< SEARCH\n    warmup = 10\n"
    "=======\n    warmup = 5\n>>>>>>> REPLACE\n```\nThis should help.\n",
])
def test_parse_tolerates_markdown_fences(text, repo):
    edit = parse_edit(text)
    assert edit.hypothesis == "shorter warmup"
    assert edit.paths() == ["nanomodel/train.py"]
    assert apply_edit(edit, repo) == ["nanomodel/train.py"]
    assert "    warmup = 5\n" in (repo / "nanomodel" / "train.py").read_text()


@pytest.mark.parametrize("text, message", [
    ("Make the model faster by using a bigger batch.\n", "neither SEARCH/REPLACE blocks nor a unified diff"),
    ("@@ -1,2 +1,2 @@\n a\n-b\n+c\n", "no file header"),
    ("x.py\n<<<<<<< SEARCH\na\n=======\nb\n", "x.py: block #1 is unterminated"),
    ("x.py\n<<<<<<< SEARCH\na\n>>>>>>> REPLACE\n", "block #1 is unterminated"),
    ("<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n", "block #1 has no file path"),
    ("Change the file as follows\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n", "no file path"),
    (block("/etc/passwd", "a\n", "b\n"), "absolute"),
    (block("nanomodel/../../x.py", "a\n", "b\n"), "'..'"),
    (block(".git/hooks/pre-commit", "", "echo hi\n"), ".git"),
    ("--- a/../evil.py\n+++ b/../evil.py\n@@ -1 +1 @@\n-a\n+b\n", "'..'"),
])
def test_parse_rejects_bad_text(text, message):
    with pytest.raises(EditError) as error:
        parse_edit(text)
    assert message in str(error.value)


# --- SEARCH/REPLACE application --------------------------------------------------------------------------

def test_several_files_and_blocks_apply_in_order(repo):
    text = (block("nanomodel/train.py", "    warmup = 10\n", "    warmup = 5\n")
            # no path line: the block continues the previous file, and sees the first block's result
            + "<<<<<<< SEARCH\n    warmup = 5\n    if step < warmup:\n=======\n"
              "    warmup = 4\n    if step < warmup:\n>>>>>>> REPLACE\n\n"
            + block("README.md", "A tiny model.\n", "A tiny, fast model.\n"))
    edit = parse_edit(text)
    assert edit.paths() == ["nanomodel/train.py", "README.md"]
    assert apply_edit(edit, repo) == ["nanomodel/train.py", "README.md"]
    assert (repo / "nanomodel" / "train.py").read_text() == TRAIN_PY.replace("warmup = 10", "warmup = 4")
    assert (repo / "README.md").read_text() == "# tiny\n\nA tiny, fast model.\n"


def test_empty_search_creates_a_new_file(repo):
    edit = parse_edit(block("kernels/fused/rmsnorm.py", "", "def rmsnorm(x):\n    return x\n"))
    assert apply_edit(edit, repo) == ["kernels/fused/rmsnorm.py"]
    assert (repo / "kernels" / "fused" / "rmsnorm.py").read_text() == "def rmsnorm(x):\n    return x\n"


def test_empty_search_on_an_existing_file_is_rejected(repo):
    with pytest.raises(EditError, match="empty SEARCH section but the file exists"):
        apply_edit(parse_edit(block("README.md", "", "replaced\n")), repo)


def test_search_on_a_missing_file_is_rejected(repo):
    with pytest.raises(EditError, match="nanomodel/optim.py: block #1: file does not exist"):
        apply_edit(parse_edit(block("nanomodel/optim.py", "x = 1\n", "x = 2\n")), repo)


def test_whitespace_tolerant_match_reindents_the_replacement(repo):
    # the SEARCH is dedented by 4 and has trailing spaces; the replacement follows the file's indentation
    search = "if step < warmup:   \n    return step / warmup\n"
    replace = "if step < warmup:\n    return (step + 1) / warmup\n"
    apply_edit(parse_edit(block("nanomodel/train.py", search, replace)), repo)
    expected = TRAIN_PY.replace("        return step / warmup", "        return (step + 1) / warmup")
    assert (repo / "nanomodel" / "train.py").read_text() == expected


def test_search_not_found_names_file_block_and_nearest_text(repo):
    text = (block("README.md", "A tiny model.\n", "A small model.\n")
            + block("nanomodel/train.py", "    loss = model(batch)\n    loss.backwards()\n", "pass\n"))
    with pytest.raises(EditError) as error:
        apply_edit(parse_edit(text), repo)
    message = str(error.value)
    assert "nanomodel/train.py" in message and "block #2" in message
    assert "loss.backwards()" in message            # the first lines of the SEARCH
    assert "5 |     loss = model(batch)" in message  # the nearest region, with its line numbers
    assert "6 |     loss.backward()" in message
    assert (repo / "README.md").read_text() == "# tiny\n\nA tiny model.\n"  # block 1 was not written


def test_ambiguous_search_is_rejected_with_line_numbers(repo):
    (repo / "twice.py").write_text("x = 0\ny = 1\nx = 0\n")
    with pytest.raises(EditError, match=r"twice\.py: block #1: SEARCH matches 2 places \(lines 1, 3\)"):
        apply_edit(parse_edit(block("twice.py", "x = 0\n", "x = 2\n")), repo)
    assert (repo / "twice.py").read_text() == "x = 0\ny = 1\nx = 0\n"


def test_failing_second_file_leaves_first_file_untouched(repo):
    before = (repo / "nanomodel" / "train.py").read_bytes()
    text = (block("nanomodel/train.py", "    warmup = 10\n", "    warmup = 5\n")
            + block("README.md", "no such line\n", "x\n"))
    with pytest.raises(EditError, match="README.md: block #2"):
        apply_edit(parse_edit(text), repo)
    assert (repo / "nanomodel" / "train.py").read_bytes() == before


@pytest.mark.parametrize("final_newline", [True, False])
def test_crlf_line_endings_and_final_newline_are_preserved(repo, final_newline):
    original = b"a = 1\r\nb = 2\r\nc = 3" + (b"\r\n" if final_newline else b"")
    (repo / "win.py").write_bytes(original)
    apply_edit(parse_edit(block("win.py", "b = 2\nc = 3\n", "b = 20\nc = 30\nd = 40\n")), repo)
    expected = b"a = 1\r\nb = 20\r\nc = 30\r\nd = 40" + (b"\r\n" if final_newline else b"")
    assert (repo / "win.py").read_bytes() == expected


def test_paths_escaping_the_root_through_a_symlink_are_rejected(repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / "link").symlink_to(outside)
    with pytest.raises(EditError, match="outside the repository"):
        apply_edit(parse_edit(block("link/evil.py", "", "print('hi')\n")), repo)
    assert not (outside / "evil.py").exists()


# --- unified diffs ---------------------------------------------------------------------------------------

def change_warmup_and_add_file(root: Path):
    train = root / "nanomodel" / "train.py"
    train.write_text(train.read_text().replace("warmup = 10", "warmup = 5").replace("import torch\n",
                                                                                    "import math\nimport torch\n"))
    (root / "nanomodel" / "sched.py").write_text("def cosine(t):\n    return t\n")


def test_git_diff_applies(repo):
    diff = git_diff_of(repo, change_warmup_and_add_file)
    edit = parse_edit(diff)
    assert edit.format == "diff"
    assert edit.paths() == ["nanomodel/sched.py", "nanomodel/train.py"]
    assert sorted(apply_edit(edit, repo)) == ["nanomodel/sched.py", "nanomodel/train.py"]
    train = (repo / "nanomodel" / "train.py").read_text()
    assert train.startswith("import math\nimport torch\n") and "warmup = 5" in train
    assert (repo / "nanomodel" / "sched.py").read_text() == "def cosine(t):\n    return t\n"


def test_fenced_diff_with_header_and_prose_applies(repo):
    diff = git_diff_of(repo, change_warmup_and_add_file)
    text = (f"HYPOTHESIS: shorter warmup\nRATIONALE: fewer slow steps.\n\n```diff\n{diff}```\n\n"
            "These changes should cut the warmup time.\n")
    edit = parse_edit(text)
    assert (edit.hypothesis, edit.rationale, edit.format) == ("shorter warmup", "fewer slow steps.", "diff")
    apply_edit(edit, repo)
    assert "warmup = 5" in (repo / "nanomodel" / "train.py").read_text()


def test_hand_written_diff_without_prefixes_or_true_line_numbers_applies(repo):
    # as LLMs write them: no a/ b/ prefixes, made-up line numbers and counts
    diff = ("--- nanomodel/train.py\n+++ nanomodel/train.py\n@@ -50,9 +50,9 @@\n"
            " def lr_at(step, total):\n-    warmup = 10\n+    warmup = 3\n     if step < warmup:\n")
    assert parse_edit(diff).paths() == ["nanomodel/train.py"]
    apply_edit(parse_edit(diff), repo)
    assert (repo / "nanomodel" / "train.py").read_text() == TRAIN_PY.replace("warmup = 10", "warmup = 3")


def test_diff_paths_cover_renames_and_deletions(repo):
    def rename_and_delete(root: Path):
        (root / "nanomodel" / "train.py").rename(root / "nanomodel" / "loop.py")
        (root / "README.md").unlink()
    diff = git_diff_of(repo, rename_and_delete)
    edit = parse_edit(diff)
    assert set(edit.paths()) == {"README.md", "nanomodel/train.py", "nanomodel/loop.py"}
    apply_edit(edit, repo)
    assert not (repo / "README.md").exists() and not (repo / "nanomodel" / "train.py").exists()
    assert (repo / "nanomodel" / "loop.py").read_text() == TRAIN_PY


def test_diff_with_quoted_names_is_read_like_git():
    # git may quote any name; a quoted protected path must not slip past paths()
    edit = parse_edit('--- "a/kernels/\\162ef.py"\n+++ "b/kernels/\\162ef.py"\n@@ -1 +1 @@\n-a\n+b\n')
    assert edit.paths() == ["kernels/ref.py"]


def test_failing_hunk_names_file_hunk_and_nearest_text(repo):
    diff = git_diff_of(repo, change_warmup_and_add_file)
    train = repo / "nanomodel" / "train.py"
    train.write_text(train.read_text().replace("    warmup = 10\n", "    warmup = 12\n"))
    before = train.read_text()
    with pytest.raises(EditError) as error:
        apply_edit(parse_edit(diff), repo)
    message = str(error.value)
    assert "nanomodel/train.py" in message and "hunk #2" in message
    assert "11 |     warmup = 12" in message  # nearest text, with its line number
    assert train.read_text() == before and not (repo / "nanomodel" / "sched.py").exists()


def test_diff_through_a_symlink_out_of_the_root_is_rejected(repo, tmp_path):
    (tmp_path / "outside").mkdir()
    (repo / "link").symlink_to(tmp_path / "outside")
    diff = "--- /dev/null\n+++ b/link/evil.py\n@@ -0,0 +1 @@\n+print('hi')\n"
    with pytest.raises(EditError, match="outside the repository"):
        apply_edit(parse_edit(diff), repo)
    assert not (tmp_path / "outside" / "evil.py").exists()


# --- normalized diffs ------------------------------------------------------------------------------------

BASE_DIFF = """\
diff --git a/nanomodel/train.py b/nanomodel/train.py
index 1111111..2222222 100644
--- a/nanomodel/train.py
+++ b/nanomodel/train.py
@@ -10,5 +10,5 @@ def lr_at(step, total):
 def lr_at(step, total):
-    warmup = 10
+    warmup = 5
     if step < warmup:
"""


def test_normalized_diff_ignores_line_numbers_index_trailing_spaces_and_blank_lines():
    moved = (BASE_DIFF.replace("index 1111111..2222222", "index 3333333..4444444")
             .replace("@@ -10,5 +10,5 @@ def lr_at(step, total):", "@@ -40,5 +41,6 @@")
             .replace("+    warmup = 5\n", "+    warmup = 5   \n+\n"))
    assert moved != BASE_DIFF
    assert normalized_diff(moved) == normalized_diff(BASE_DIFF)
    assert edit_fingerprint(moved) == edit_fingerprint(BASE_DIFF)
    assert len(edit_fingerprint(BASE_DIFF)) == 64


def test_normalized_diff_keeps_real_changes_apart():
    other = BASE_DIFF.replace("+    warmup = 5", "+    warmup = 6")
    assert normalized_diff(other) != normalized_diff(BASE_DIFF)
    assert edit_fingerprint(other) != edit_fingerprint(BASE_DIFF)


def test_tree_fingerprint_matches_the_same_change_wherever_it_was_made(tmp_path):
    old, a, b, c = (tmp_path / name for name in ("old", "a", "b", "c"))
    for root, text in ((old, "x = 1\ny = 2\n"), (a, "x = 1\ny = 3\n"), (b, "x = 1\n\ny = 3   \n"), (c, "x = 1\ny = 4\n")):
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / "m.py").write_text(text)
    assert tree_fingerprint(old, a, ["pkg/m.py"]) == tree_fingerprint(old, b, ["pkg/m.py"])  # blank line, spaces
    assert tree_fingerprint(old, a, ["pkg/m.py"]) != tree_fingerprint(old, c, ["pkg/m.py"])
    (a / "pkg" / "new.py").write_text("z = 0\n")  # a file the edit creates counts as a change from empty
    assert tree_fingerprint(old, a, ["pkg/m.py", "pkg/new.py"]) != tree_fingerprint(old, b, ["pkg/m.py"])
