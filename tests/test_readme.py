"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its examples"
    namespace: dict = {}  # one session, top to bottom, as a reader would run them
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
