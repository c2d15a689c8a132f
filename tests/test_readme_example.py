"""The README's 'Using the planner in your own JAX code' examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the planner in your own JAX code"


def section_examples() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]  # up to the next section
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_section_has_the_two_examples():
    examples = section_examples()
    assert len(examples) == 2
    assert "cem(" in examples[0] and "make_planner(" in examples[1]


@pytest.mark.parametrize("index", [0, 1], ids=["cem_user_objective", "planet_planner"])
def test_readme_example_runs(index):
    # Each block runs on its own, in a fresh namespace; its asserts are the checks.
    exec(compile(section_examples()[index], f"README.md example {index}", "exec"), {})
