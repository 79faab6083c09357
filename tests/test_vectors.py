import numpy as np
import pytest
from gensim.models import KeyedVectors

from notice.method.vectors import VectorsError, load_vectors, phrase_vector

WORDS = ["red", "blue", "green", "light", "Paris", "ice_cream"]


@pytest.fixture(scope="module")
def small_kv() -> KeyedVectors:
    rng = np.random.default_rng(0)
    kv = KeyedVectors(vector_size=7, count=0, dtype=np.float32)
    kv.add_vectors(WORDS, rng.normal(size=(len(WORDS), 7)).astype(np.float32))
    return kv


def _assert_same(loaded: KeyedVectors, expected: KeyedVectors) -> None:
    assert loaded.index_to_key == expected.index_to_key
    np.testing.assert_allclose(loaded.vectors, expected.vectors, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, save",
    [
        ("vectors.bin", lambda kv, p: kv.save_word2vec_format(p, binary=True)),
        ("vectors.bin.gz", lambda kv, p: kv.save_word2vec_format(p, binary=True)),
        ("vectors.txt", lambda kv, p: kv.save_word2vec_format(p, binary=False)),
        ("glove.txt", lambda kv, p: kv.save_word2vec_format(p, binary=False, write_header=False)),
        ("vectors.kv", lambda kv, p: kv.save(p)),
    ],
)
def test_every_format_loads_the_same_vectors(tmp_path, small_kv, name, save):
    path = tmp_path / name
    save(small_kv, str(path))
    _assert_same(load_vectors(str(path)), small_kv)


def test_glove_text_without_header_is_detected(tmp_path, small_kv):
    path = tmp_path / "glove.6B.7d.txt"
    small_kv.save_word2vec_format(str(path), binary=False, write_header=False)
    assert not path.read_text().splitlines()[0].split()[0].isdigit()
    _assert_same(load_vectors(path), small_kv)


def test_replaced_file_is_reloaded_not_served_from_cache(tmp_path, small_kv):
    path = tmp_path / "v.txt"
    small_kv.save_word2vec_format(str(path))
    first = load_vectors(path)
    other = KeyedVectors(vector_size=7, count=0, dtype=np.float32)
    other.add_vectors(["x"], np.ones((1, 7), dtype=np.float32))
    other.save_word2vec_format(str(path))
    path.touch()
    assert load_vectors(path).index_to_key == ["x"] and first.index_to_key == WORDS


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(VectorsError, match=r"nope\.bin.*not found"):
        load_vectors(tmp_path / "nope.bin")


@pytest.mark.parametrize(
    "name, content", [("broken.bin", b"3 7\nred \x00\x01"), ("broken.txt", b"1 3\nred 0.1 zz 0.3\n")]
)
def test_unparseable_file_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VectorsError, match=name.replace(".", r"\.")):
        load_vectors(path)


def test_packaged_glove_loads_and_matches_gensim_and_numpy():
    kv = load_vectors(None)
    assert kv is load_vectors("glove-6b-50d")  # cached: loaded once per process
    assert kv.vectors.shape == (400000, 50) and kv.index_to_key[0] == "the"
    red, blue = kv["red"].astype(np.float64), kv["blue"].astype(np.float64)
    expected = red @ blue / (np.linalg.norm(red) * np.linalg.norm(blue))
    assert kv.similarity("red", "blue") == pytest.approx(expected, abs=1e-6)
    assert kv.similarity("red", "blue") == pytest.approx(0.890, abs=1e-3)
    assert kv.most_similar("red", topn=1)[0][0] in kv.key_to_index


def test_phrase_vector_single_word_multi_word_case_and_missing(small_kv):
    vec, reason = phrase_vector(small_kv, "red")
    assert reason == "" and np.allclose(vec, small_kv.get_vector("red", norm=True))
    vec, _ = phrase_vector(small_kv, "light blue")
    expected = (small_kv.get_vector("light", norm=True) + small_kv.get_vector("blue", norm=True)) / 2
    assert np.allclose(vec, expected)
    assert phrase_vector(small_kv, "Red")[1] == ""  # falls back to lower case
    assert phrase_vector(small_kv, "Paris")[1] == ""  # exact case first
    assert phrase_vector(small_kv, "light mauve") == (None, "not in vocabulary: mauve")
