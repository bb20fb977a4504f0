"""The public API: `import nvae_tf` names, and docs/api.md's examples run.

Every ```python block of docs/api.md runs in order in one namespace; each
must assert something. A block that names `OFFICIAL_CHECKPOINT` gets the
official fixture's path and is skipped without the fixtures.
"""

import os
import re
import subprocess
import sys

import pytest

import nvae_tf
from tests.test_official_fixtures import FIXTURE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_DOC = os.path.join(ROOT, "docs", "api.md")
OFFICIAL_CHECKPOINT = os.path.join(FIXTURE_DIR, "tiny_binary.pt")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    """[(line number, code)] of the python blocks of docs/api.md."""
    with open(API_DOC) as f:
        text = f.read()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in _BLOCK.finditer(text)]


BLOCKS = _blocks()


@pytest.fixture(scope="module")
def namespace():
    """The shared namespace and how many blocks have run in it."""
    return {"globals": {"__name__": "docs_api",
                        "OFFICIAL_CHECKPOINT": OFFICIAL_CHECKPOINT},
            "done": 0}


def _needs_fixture(code):
    return "OFFICIAL_CHECKPOINT" in code


def test_the_doc_has_examples_and_each_asserts():
    assert len(BLOCKS) >= 7
    for line, code in BLOCKS:
        assert re.search(r"^\s*(assert |np\.testing\.assert)", code, re.M), (
            f"docs/api.md:{line}: the block asserts nothing")
    assert sum(_needs_fixture(code) for _, code in BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"line{line}" for line, _ in BLOCKS])
def test_doc_example_runs(namespace, index):
    """Runs block `index` after the blocks above it that have not run."""
    have_fixture = os.path.exists(OFFICIAL_CHECKPOINT)
    if _needs_fixture(BLOCKS[index][1]) and not have_fixture:
        pytest.skip(f"{OFFICIAL_CHECKPOINT} not found")
    while namespace["done"] <= index:
        line, code = BLOCKS[namespace["done"]]
        namespace["done"] += 1
        if _needs_fixture(code) and not have_fixture:
            continue
        # Padded so that tracebacks give the line in docs/api.md.
        exec(compile("\n" * (line - 1) + code, API_DOC, "exec"),  # noqa: S102
             namespace["globals"])


def test_public_names():
    from nvae_tf import NVAE, NVAEConfig  # noqa: F401  the acceptance line
    from nvae_tf import distributions, model, objectives
    assert nvae_tf.NVAE is model.NVAE
    assert nvae_tf.NVAEOutput is model.NVAEOutput
    assert nvae_tf.DiscretizedLogisticMixture is \
        distributions.DiscretizedLogisticMixture
    assert nvae_tf.bits_per_dim is objectives.bits_per_dim
    assert callable(nvae_tf.convert.load_official_checkpoint)
    # pylint: disable-next=protected-access
    assert set(nvae_tf.__all__) == {"NVAEConfig", *nvae_tf._LAZY_EXPORTS,
                                    *nvae_tf._LAZY_SUBMODULES}
    for name in nvae_tf.__all__:
        assert getattr(nvae_tf, name) is not None, name
    assert set(nvae_tf.__all__) <= set(dir(nvae_tf))
    with pytest.raises(AttributeError, match="no attribute 'Nvae'"):
        nvae_tf.Nvae  # pylint: disable=pointless-statement


def test_the_config_alone_does_not_start_tensorflow():
    code = ("import sys, nvae_tf, nvae_tf.config; "
            "assert nvae_tf.NVAEConfig is nvae_tf.config.NVAEConfig; "
            "print(sorted(m for m in ('tensorflow', 'keras') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
