"""README stays true about the node list and the two commands."""
from pathlib import Path

import twinflow
from twinflow.comfy_adapter import nodes as comfy_nodes

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_node_is_listed():
    ids = list(twinflow.NODE_CLASS_MAPPINGS) + list(comfy_nodes.NODE_CLASS_MAPPINGS)
    missing = [i for i in ids if f"`{i}`" not in README]
    assert not missing, f"README node table lacks {missing}"


def test_the_two_commands_and_ci_agree():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "./dev quickstart" in README and "./dev test" in README
    assert "./dev test" in ci
