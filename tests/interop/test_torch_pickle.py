"""Tests for nvae_tf.interop.torch_pickle (reading torch.save files without torch)."""

import argparse
import collections
import io
import json
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest

from nvae_tf.interop.torch_pickle import (
    LEGACY_MAGIC_NUMBER,
    CheckpointFormatError,
    ForbiddenGlobalError,
    TorchDType,
    load_torch_checkpoint,
)

FIXTURE_DIR = "/work/shared/fixtures/official"
FIXTURES = ["tiny_binary", "tiny_rgb_flow", "tiny_5bit_3scale"]
_BUFFER_SUFFIXES = ("weight_normalized", "running_mean", "running_var", "num_batches_tracked")

needs_fixtures = pytest.mark.skipif(
    not os.path.isdir(FIXTURE_DIR), reason="official NVAE fixtures not available")


@pytest.fixture(scope="module")
def loaded():
    """name -> (checkpoint, json description); each file is read once."""
    cache = {}

    def get(name):
        if name not in cache:
            with open(os.path.join(FIXTURE_DIR, name + ".json")) as f:
                desc = json.load(f)
            cache[name] = (load_torch_checkpoint(os.path.join(FIXTURE_DIR, name + ".pt")), desc)
        return cache[name]

    return get


# --------------------------------------------------------------------------
# official fixtures
# --------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_structure_and_counts(loaded, name):
    ckpt, desc = loaded(name)
    assert isinstance(ckpt, dict)
    for key in ("state_dict", "args", "optimizer", "global_step", "epoch"):
        assert key in ckpt
    sd = ckpt["state_dict"]
    assert isinstance(sd, collections.OrderedDict)
    assert len(sd) == desc["model"]["num_state_dict_entries"]
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    n_params = sum(v.size for k, v in sd.items() if not k.endswith(_BUFFER_SUFFIXES))
    assert n_params == desc["model"]["num_params"]
    n_alias = sum(k.endswith("weight_normalized") for k in sd)
    assert n_alias == desc["model"]["num_state_dict_alias_entries"]
    assert ckpt["global_step"] == 0 and ckpt["epoch"] == 0
    assert isinstance(ckpt["optimizer"], dict) and "param_groups" in ckpt["optimizer"]


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_args(loaded, name):
    ckpt, desc = loaded(name)
    args = ckpt["args"]
    assert isinstance(args, argparse.Namespace)
    expected = desc["config"]["args"]
    for key, value in expected.items():
        assert getattr(args, key) == value, key
        assert type(getattr(args, key)) is type(value), key


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_shapes_and_dtypes(loaded, name):
    ckpt, desc = loaded(name)
    sd = ckpt["state_dict"]
    args = desc["config"]["args"]

    prior = sd["prior_ftr0"]
    assert prior.ndim == 3 and prior.dtype == np.float32
    assert prior.shape[1] == prior.shape[2]

    stem = sd["stem.weight"]
    c_in = 1 if args["dataset"] in ("mnist", "omniglot") else 3
    assert stem.shape == (args["num_channels_enc"], c_in, 3, 3)
    assert stem.dtype == np.float32 and stem.dtype.isnative
    assert stem.flags["C_CONTIGUOUS"] and stem.flags["OWNDATA"] and stem.flags["WRITEABLE"]
    assert np.all(np.isfinite(stem)) and np.any(stem != 0)

    nbt = [k for k in sd if k.endswith("num_batches_tracked")]
    assert nbt
    for k in nbt:
        assert sd[k].shape == () and sd[k].dtype == np.int64 and int(sd[k]) >= 0

    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert v.dtype == np.float32, k
        assert v.flags["C_CONTIGUOUS"], k
        assert np.all(np.isfinite(v)), k
        if k.endswith("running_var"):
            assert np.all(v > 0), k
    # weight_normalized entries share the storage of the matching weight
    for k in sd:
        if k.endswith("weight_normalized"):
            np.testing.assert_array_equal(sd[k], sd[k[: -len("weight_normalized")] + "weight"])


@needs_fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_values_match_batchnorm_loss(loaded, name):
    """model.batchnorm_loss() = sum over BN layers of max|gamma|, stored in the
    .npz; BN gammas are not touched by the train pass, so it checks raw values."""
    ckpt, _ = loaded(name)
    sd = ckpt["state_dict"]
    total = np.float32(0)
    for k in sd:
        if k.endswith("running_mean"):
            total += np.abs(sd[k[: -len("running_mean")] + "weight"]).max()
    with np.load(os.path.join(FIXTURE_DIR, name + ".npz")) as z:
        expected = z["train_bn_loss"]
    np.testing.assert_allclose(total, expected, rtol=1e-6)


@needs_fixtures
def test_file_object_input(loaded):
    ckpt, _ = loaded("tiny_binary")
    with open(os.path.join(FIXTURE_DIR, "tiny_binary.pt"), "rb") as f:
        again = load_torch_checkpoint(f)
    assert list(again["state_dict"]) == list(ckpt["state_dict"])
    np.testing.assert_array_equal(again["state_dict"]["stem.weight"], ckpt["state_dict"]["stem.weight"])


# --------------------------------------------------------------------------
# malformed / malicious files
# --------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_fixture_raises_value_error(tmp_path, fraction):
    with open(os.path.join(FIXTURE_DIR, "tiny_binary.pt"), "rb") as f:
        data = f.read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_torch_checkpoint(path)


@needs_fixtures
def test_corrupted_storage_raises_value_error(tmp_path):
    data = bytearray(open(os.path.join(FIXTURE_DIR, "tiny_binary.pt"), "rb").read())
    pos = data.find(b"tiny_binary/data/1") + 200  # inside the bytes of a stored record
    data[pos] ^= 0xFF
    path = tmp_path / "corrupt.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint.*CRC"):
        load_torch_checkpoint(path)


def test_numpy_scalars_and_arrays(tmp_path):
    obj = {"step": np.int64(3), "lr": np.float32(0.5), "arr": np.arange(6.0).reshape(2, 3)}
    path = _write_zip(tmp_path / "np.pt", pickle.dumps(obj, protocol=2), {})
    out = load_torch_checkpoint(path)
    assert out["step"] == 3 and out["step"].dtype == np.int64
    assert out["lr"] == np.float32(0.5)
    np.testing.assert_array_equal(out["arr"], obj["arr"])
    # numpy.ndarray itself cannot be called (it could wrap uninitialised memory)
    evil = _proto2(_call(_global("numpy", "ndarray"), _tuple(_int(1000))))
    with pytest.raises(ValueError):
        load_torch_checkpoint(_write_zip(tmp_path / "np_evil.pt", evil, {}))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\x80\x02K\x01."])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match="not a readable PyTorch checkpoint"):
        load_torch_checkpoint(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/readme.txt", "hi")
    with pytest.raises(ValueError, match="data.pkl"):
        load_torch_checkpoint(path)


_OS_SYSTEM_PROTO0 = b"cos\nsystem\n(S'touch %s'\ntR."


@pytest.mark.parametrize("layout", ["zip", "raw_protocol2"])
def test_os_system_is_refused(tmp_path, layout):
    marker = tmp_path / "pwned"
    if layout == "zip":
        payload = _OS_SYSTEM_PROTO0 % str(marker).encode()
        path = _write_zip(tmp_path / "evil.pt", payload, {})
    else:
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch " + str(marker),))

        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system") as info:
        load_torch_checkpoint(path)
    assert isinstance(info.value, ForbiddenGlobalError)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"), ("__builtin__", "getattr"), ("torch", "load"),
    ("torch._utils", "_import_dotted_name"), ("subprocess", "Popen"), ("numpy", "load"),
])
def test_other_globals_are_refused(tmp_path, module, name):
    payload = b"\x80\x04" + _unicode(module) + _unicode(name) + b"\x93" + b")R."  # STACK_GLOBAL
    path = _write_zip(tmp_path / "evil.pt", payload, {})
    with pytest.raises(ForbiddenGlobalError, match=name):
        load_torch_checkpoint(path)


def test_out_of_bounds_view_is_rejected(tmp_path):
    obj = _tensor("FloatStorage", "0", 4, 2, (2, 2), (2, 1))  # needs 6 elements
    path = _write_zip(tmp_path / "oob.pt", _proto2(obj), {"0": np.arange(4, dtype="<f4").tobytes()})
    with pytest.raises(ValueError, match="storage"):
        load_torch_checkpoint(path)


def test_short_storage_record_is_rejected(tmp_path):
    obj = _tensor("FloatStorage", "0", 4, 0, (4,), (1,))
    path = _write_zip(tmp_path / "short.pt", _proto2(obj), {"0": b"\0" * 12})
    with pytest.raises(ValueError, match="bytes"):
        load_torch_checkpoint(path)


# --------------------------------------------------------------------------
# synthetic checkpoints: dtypes, views, byte order, helpers, legacy format
# --------------------------------------------------------------------------


def _unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n):
    return b"J" + struct.pack("<i", n)


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _call(fn, *args):
    return fn + _tuple(*args) + b"R"


def _pid(storage, key, numel, legacy_view=False):
    fields = [_unicode("storage"), _global("torch", storage), _unicode(key), _unicode("cpu"), _int(numel)]
    if legacy_view is not False:
        fields.append(b"N" if legacy_view is None else _tuple(_unicode(legacy_view[0]),
                                                             _int(legacy_view[1]), _int(legacy_view[2])))
    return _tuple(*fields) + b"Q"


def _tensor(storage, key, numel, offset, size, stride, legacy_view=False):
    return _call(_global("torch._utils", "_rebuild_tensor_v2"),
                 _pid(storage, key, numel, legacy_view), _int(offset),
                 _tuple(*map(_int, size)), _tuple(*map(_int, stride)),
                 b"\x89", _call(_global("collections", "OrderedDict")))


def _dict(pairs):
    return b"}(" + b"".join(_unicode(k) + v for k, v in pairs) + b"u"


def _proto2(body):
    return b"\x80\x02" + body + b"."


def _write_zip(path, pkl, storages, byteorder=b"little", prefix="archive"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


_SYNTH_CASES = [
    # name, storage type, numpy source dtype, expected dtype
    ("f32", "FloatStorage", "f4", np.float32),
    ("f64", "DoubleStorage", "f8", np.float64),
    ("f16", "HalfStorage", "f2", np.float16),
    ("i64", "LongStorage", "i8", np.int64),
    ("i32", "IntStorage", "i4", np.int32),
    ("i16", "ShortStorage", "i2", np.int16),
    ("i8", "CharStorage", "i1", np.int8),
    ("u8", "ByteStorage", "u1", np.uint8),
]


def _synthetic(byteorder):
    """Checkpoint body and storages covering dtypes, strides, 0-d and empty tensors."""
    order = "<" if byteorder == b"little" else ">"
    pairs, storages, expected = [], {}, {}
    for i, (name, storage, src, dt) in enumerate(_SYNTH_CASES):
        base = (np.arange(24) - 7).astype(src)  # 24 elements, negative values for signed types
        if np.dtype(src).kind == "u":
            base = np.arange(24).astype(src)
        key = str(i)
        storages[key] = base.astype(np.dtype(src).newbyteorder(order)).tobytes()
        # a transposed view with an offset: storage[1:13].reshape(3, 4).T
        pairs.append((name, _tensor(storage, key, 24, 1, (4, 3), (1, 4))))
        expected[name] = base[1:13].reshape(3, 4).T.astype(dt)
    bools = np.array([True, False, True, True])
    storages["b"] = bools.tobytes()
    pairs.append(("bool", _tensor("BoolStorage", "b", 4, 0, (4,), (1,))))
    expected["bool"] = bools
    # 0-d tensor at offset 5, empty tensor, broadcast (stride 0) tensor -- reuse storage 0
    pairs.append(("scalar", _tensor("FloatStorage", "0", 24, 5, (), ())))
    expected["scalar"] = np.array(-2.0, np.float32)
    pairs.append(("empty", _tensor("FloatStorage", "0", 24, 0, (0, 3), (3, 1))))
    expected["empty"] = np.zeros((0, 3), np.float32)
    pairs.append(("expand", _tensor("FloatStorage", "0", 24, 2, (2, 3), (0, 1))))
    expected["expand"] = np.array([[-5, -4, -3], [-5, -4, -3]], np.float32)
    return pairs, storages, expected


@pytest.mark.parametrize("byteorder", [b"little", b"big"])
def test_synthetic_dtypes_views_and_byteorder(tmp_path, byteorder):
    pairs, storages, expected = _synthetic(byteorder)
    path = _write_zip(tmp_path / "synth.pt", _proto2(_dict(pairs)), storages, byteorder=byteorder)
    out = load_torch_checkpoint(path)
    assert set(out) == set(expected)
    for name, want in expected.items():
        got = out[name]
        assert got.dtype == want.dtype and got.dtype.isnative, name
        assert got.shape == want.shape, name
        assert got.flags["C_CONTIGUOUS"], name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_missing_byteorder_record_means_little_endian(tmp_path):
    data = np.array([1.5, -2.0], "<f4")
    path = _write_zip(tmp_path / "nob.pt", _proto2(_tensor("FloatStorage", "0", 2, 0, (2,), (1,))),
                      {"0": data.tobytes()}, byteorder=None)
    np.testing.assert_array_equal(load_torch_checkpoint(path), data)


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")  # exact bfloat16 values
    path = _write_zip(tmp_path / "bf16.pt", _proto2(_tensor("BFloat16Storage", "0", 4, 0, (2, 2), (2, 1))),
                      {"0": bits.tobytes()})
    out = load_torch_checkpoint(path)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values.reshape(2, 2))


def test_parameter_size_dtype_helpers(tmp_path):
    data = np.arange(6, dtype="<f4")
    param = _call(_global("torch._utils", "_rebuild_parameter"),
                  _tensor("FloatStorage", "0", 6, 0, (2, 3), (3, 1)), b"\x88",
                  _call(_global("collections", "OrderedDict")))
    v3 = _call(_global("torch._utils", "_rebuild_tensor_v3"),
               _pid("UntypedStorage", "1", 8), _int(1), _tuple(_int(1)), _tuple(_int(1)),
               b"\x89", _call(_global("collections", "OrderedDict")), _global("torch", "float32"))
    from_type = _call(_global("torch._tensor", "_rebuild_from_type_v2"),
                      _global("torch._utils", "_rebuild_tensor_v2"),
                      _global("torch.nn.parameter", "Parameter"),
                      _tuple(_pid("FloatStorage", "0", 6), _int(4), _tuple(_int(2)), _tuple(_int(1)),
                             b"\x89", _call(_global("collections", "OrderedDict"))),
                      b"N")
    body = _dict([
        ("param", param),
        ("v3", v3),
        ("from_type", from_type),
        ("size", _call(_global("torch", "Size"), _tuple(_int(2), _int(3)))),
        ("dtype", _global("torch", "float16")),
        ("set", _call(_global("__builtin__", "set"), b"](" + _int(1) + _int(2) + b"e")),
        ("bytes", _call(_global("_codecs", "encode"), _unicode("ab\xff"), _unicode("latin1"))),
    ])
    path = _write_zip(tmp_path / "helpers.pt", _proto2(body),
                      {"0": data.tobytes(), "1": np.array([7.0, 8.0], "<f4").tobytes()})
    out = load_torch_checkpoint(path)
    np.testing.assert_array_equal(out["param"], data.reshape(2, 3))
    np.testing.assert_array_equal(out["v3"], np.array([8.0], np.float32))
    np.testing.assert_array_equal(out["from_type"], np.array([4.0, 5.0], np.float32))
    assert out["size"] == (2, 3)
    assert out["dtype"] == TorchDType("float16") and out["dtype"].numpy_dtype == np.float16
    assert out["set"] == {1, 2}
    assert out["bytes"] == b"ab\xff"


def _legacy_file(main_pickle, storages):
    """A PyTorch < 1.6 (non-zip) torch.save stream; storages: key -> (numel, raw LE bytes)."""
    header = b"".join(pickle.dumps(x, protocol=2) for x in (
        LEGACY_MAGIC_NUMBER, 1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}))
    keys = list(storages)
    body = b"".join(struct.pack("<q", numel) + raw for numel, raw in storages.values())
    return header + main_pickle + pickle.dumps(keys, protocol=2) + body


def test_legacy_format_synthetic(tmp_path):
    root = np.arange(10, dtype="<f4")
    longs = np.array([3, -4], "<i8")
    body = _dict([
        ("a", _tensor("FloatStorage", "140", 10, 1, (2, 2), (1, 2), legacy_view=None)),
        # a storage view: elements 4..9 of the root storage, tensor at offset 1 within it
        ("b", _tensor("FloatStorage", "140", 10, 1, (3,), (1,), legacy_view=("141", 4, 6))),
        ("c", _tensor("LongStorage", "150", 2, 0, (2,), (1,), legacy_view=None)),
    ])
    path = tmp_path / "legacy.pt"
    path.write_bytes(_legacy_file(_proto2(body), {"150": (2, longs.tobytes()), "140": (10, root.tobytes())}))
    out = load_torch_checkpoint(path)
    np.testing.assert_array_equal(out["a"], np.array([[1, 3], [2, 4]], np.float32))
    np.testing.assert_array_equal(out["b"], np.array([5, 6, 7], np.float32))
    np.testing.assert_array_equal(out["c"], longs)
    assert out["c"].dtype == np.int64

    # truncated legacy files are reported as unreadable
    data = path.read_bytes()
    for cut in (len(data) - 3, len(data) // 2, 30):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
            load_torch_checkpoint(path)


class _PidScanner(pickle.Unpickler):
    """Collects persistent ids of our own trusted fixture (test helper only)."""

    def __init__(self, data):
        super().__init__(io.BytesIO(data))
        self.pids = []

    def find_class(self, module, name):
        if name.endswith("Storage"):
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        return lambda *args, **kwargs: None

    def persistent_load(self, pid):
        self.pids.append(pid)


@needs_fixtures
def test_legacy_format_from_fixture_matches_zip(tmp_path, loaded):
    """Rewrite tiny_binary.pt into the legacy stream format and load it."""
    ckpt, _ = loaded("tiny_binary")
    with zipfile.ZipFile(os.path.join(FIXTURE_DIR, "tiny_binary.pt")) as zf:
        pkl = zf.read("tiny_binary/data.pkl")
        raw = {n.rsplit("/", 1)[1]: zf.read(n) for n in zf.namelist() if "/data/" in n}
    # legacy persistent ids carry a sixth field (view metadata, None here):
    # insert NONE before the TUPLE that closes each storage id.
    inserts, last_tuple = [], None
    for op, _, pos in pickletools.genops(pkl):
        if op.name == "TUPLE":
            last_tuple = pos
        elif op.name == "BINPERSID":
            inserts.append(last_tuple)
    pieces, prev = [], 0
    for pos in inserts:
        pieces += [pkl[prev:pos], b"N"]
        prev = pos
    legacy_pkl = b"".join(pieces) + pkl[prev:]
    scanner = _PidScanner(legacy_pkl)
    scanner.load()
    itemsize = {"FloatStorage": 4, "LongStorage": 8}
    storages = {}
    for _, stype, key, _, numel, view in scanner.pids:
        assert view is None
        assert len(raw[key]) == numel * itemsize[stype]
        storages[key] = (numel, raw[key])
    path = tmp_path / "legacy_tiny_binary.pt"
    path.write_bytes(_legacy_file(legacy_pkl, storages))

    out = load_torch_checkpoint(path)
    assert vars(out["args"]) == vars(ckpt["args"])
    assert list(out["state_dict"]) == list(ckpt["state_dict"])
    for k, v in ckpt["state_dict"].items():
        w = out["state_dict"][k]
        assert w.dtype == v.dtype and w.shape == v.shape, k
        np.testing.assert_array_equal(w, v, err_msg=k)


def test_torchscript_archive_is_rejected(tmp_path):
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", _proto2(b"N"))
        zf.writestr("m/constants.pkl", _proto2(b")"))
        zf.writestr("m/code/__torch__.py", "")
    with pytest.raises(ValueError, match="TorchScript"):
        load_torch_checkpoint(path)


def test_legacy_tar_format_gives_resave_hint(tmp_path):
    import tarfile

    path = tmp_path / "old.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("storages")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match=r"legacy.*torch\.save\(torch\.load"):
        load_torch_checkpoint(path)
