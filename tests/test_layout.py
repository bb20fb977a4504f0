"""The package layout: which modules may import which.

The model and its layers are plain Keras code: the performance package
(`nvae_tf.fast`, applied at the model boundary) and the benchmarks sit on
top of them, never below. No runtime module imports the benchmarks.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_MODULES = ["nvae_tf/model.py", "nvae_tf/latents.py",
                 "nvae_tf/distributions.py", "nvae_tf/objectives.py",
                 "nvae_tf/config.py"]
FORBIDDEN_BELOW_THE_MODEL = ("nvae_tf.fast", "benchmarks")


def _imports(path, root=REPO):
    """Absolute names of the modules (and names) a file imports.

    `path` is relative to `root`, the repository root.
    """
    with open(os.path.join(root, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                package = os.path.dirname(path).replace(os.sep, ".")
                parts = package.split(".")[:len(package.split(".")) -
                                           node.level + 1]
                base = ".".join(parts + ([node.module] if node.module
                                         else []))
            else:
                base = node.module
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _is_under(name, package):
    return name == package or name.startswith(package + ".")


def _python_files(top):
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), REPO)


def _model_and_layer_modules():
    layers = sorted(_python_files("nvae_tf/layers"))
    assert "nvae_tf/layers/norm.py" in layers
    return MODEL_MODULES + layers


@pytest.mark.parametrize("path", _model_and_layer_modules())
def test_model_and_layers_import_nothing_from_the_performance_package(path):
    bad = [name for name in _imports(path)
           if any(_is_under(name, p) for p in FORBIDDEN_BELOW_THE_MODEL)]
    assert not bad, f"{path} imports {bad}"


def test_only_benchmarks_and_tests_import_benchmarks():
    files = [path for top in ("nvae_tf", "tuning")
             for path in _python_files(top)]
    assert "nvae_tf/serving/evaluate.py" in files
    bad = {path: names for path in files
           if (names := [n for n in _imports(path)
                         if _is_under(n, "benchmarks")])}
    assert not bad, bad


def test_the_scan_sees_every_spelling_of_an_import(tmp_path):
    """Plain, from- and relative imports, also inside a function (so the
    tests above can fail)."""
    module = tmp_path / "nvae_tf" / "layers" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("import benchmarks.bench\n"
                      "from nvae_tf.fast import inference_shards\n"
                      "def f():\n"
                      "    from ..fast.constant_weights import x\n")
    names = _imports("nvae_tf/layers/bad.py", root=str(tmp_path))
    assert "benchmarks.bench" in names
    assert "nvae_tf.fast.inference_shards" in names
    assert "nvae_tf.fast.constant_weights.x" in names
    assert any(_is_under(n, "nvae_tf.fast") for n in names)
    assert not _is_under("nvae_tf.fastest", "nvae_tf.fast")
