"""Model fingerprints identify weights by their full content, and cached digests follow the file."""

import os

import pytest
import tiny

from rtune import fingerprint


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))


def _big_pair(tmp_path, size=65 * 2**20 + 123):
    """Two files over 64 MiB that differ in one byte in the middle (the old digest read only both ends)."""
    data = bytearray(os.urandom(1 << 20)) * (size // (1 << 20)) + bytearray(size % (1 << 20))
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(data)
    data[size // 2] ^= 1
    b.write_bytes(data)
    return a, b


def test_files_differing_in_the_middle_get_different_digests(tmp_path):
    a, b = _big_pair(tmp_path)
    assert fingerprint.file_digest(a) != fingerprint.file_digest(b)


def test_a_digest_is_remembered_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 1000)
    first = fingerprint.file_digest(path)
    assert list((tmp_path / "home" / "digests").glob("*.json"))
    monkeypatch.setattr(fingerprint, "_hash_file", lambda *a: pytest.fail("read again"))
    assert fingerprint.file_digest(path) == first  # from rtune's cache
    monkeypatch.undo()
    path.write_bytes(b"y" * 1000)  # same size, new content, new mtime
    os.utime(path, ns=(1, 1))
    assert fingerprint.file_digest(path) != first


def test_the_tree_digest_does_not_depend_on_threads(tmp_path):
    a, _ = _big_pair(tmp_path, size=3 * fingerprint.CHUNK // 2)
    assert fingerprint._hash_file(a, workers=1) == fingerprint._hash_file(a, workers=4)


def test_model_fingerprint_follows_the_weights(tmp_path):
    from rtune.infer.load import load_renderer

    one = tiny.tiny_model_dir(tmp_path / "one", seed=0)
    two = tiny.tiny_model_dir(tmp_path / "two", seed=1)
    renderer = load_renderer(str(one), None)
    fp1, fp2 = fingerprint.model_fingerprint(str(one), renderer), fingerprint.model_fingerprint(str(two), renderer)
    assert fp1["id"] != fp2["id"] and fp1["digest"] == fingerprint.DIGEST_METHOD
    assert fingerprint.model_fingerprint(str(one), renderer)["id"] == fp1["id"]


def test_output_environment_names_what_changes_outputs():
    env = fingerprint.output_environment("cpu", None)
    assert env["device_type"] == "cpu" and env["quantization"] is None
    assert {"torch", "transformers", "peft"} <= set(env["versions"])
    assert "bitsandbytes" not in env["versions"]
    assert fingerprint.output_environment("cuda", "nf4") != env
