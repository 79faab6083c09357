"""The paper's configuration (config/paper.yaml) on small fixtures in each dataset's real format.

Fixtures: an SVO-Probes CSV in the published column layout whose image URLs a local HTTP server on
127.0.0.1 answers (good images, a 404, a truncated file, an HTML page, a slow answer), a MIT-States
tree ``images/<adjective> <noun>/*.jpg``, a FER-2013 ``fer2013.csv`` and the ``images/<split>/<emotion>/``
folder layout, tiny random BLIP and LLaVA models and a tiny SD inpainting pipeline saved with
``save_pretrained``. The data stages run through Snakemake on them; the full paper DAG is planned.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from http_fixtures import FixtureHandler, image_bytes, serve
from PIL import Image
from tiny_inpainting import tiny_inpaint_pipeline_dir
from toy_adapters import blip_adapter, llava_adapter
from transformers import AutoTokenizer
from workflow_helpers import REPO, snakemake, write_config

from notice.data.facial_expressions import EMOTIONS
from notice.data.svo_probes import CSV_COLUMNS
from notice.demo import toy_family
from notice.method.evaluate import ALL_CATEGORIES

PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
MODELS = ("blip", "llava")
TIMEOUT_S = 2.0  # a healthy local download finishes well inside it even on a loaded machine (else pools differ)

# Words of the fixtures, added to the toy tokenizers' vocabulary. "walking" is left out on purpose:
# BLIP's WordPiece splits it into walk ##ing (2 tokens, so STR needs an equally long partner) and
# LLaVA's word-level tokenizer makes it <unk>.
EXTRA_WORDS = [
    "child",
    "lady",
    "dog",
    "cat",
    "man",
    "boy",
    "girl",
    "woman",
    "person",
    "crossing",
    "sitting",
    "running",
    "eating",
    "riding",
    "sleeping",
    "walk",
    "##ing",
    "street",
    "road",
    "grass",
    "beach",
    "bench",
    "horse",
    "bike",
    "apple",
    "bread",
    "building",
    "shirt",
    "this",
    "feeling",
    "old",
    "new",
    "ancient",
    "small",
    "large",
    "sliced",
    "wrinkled",
    "crumpled",
    "frayed",
    *EMOTIONS,
]


# -- the image server ------------------------------------------------------------------------------------
class Handler(FixtureHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if match := re.fullmatch(r"/img/(\d+)\.jpg", self.path):
            return self.send(200, "image/jpeg", image_bytes(int(match.group(1))))
        if self.path == "/missing.jpg":
            return self.send(404, "text/html", b"<html>not found</html>")
        if self.path == "/truncated.jpg":
            data = image_bytes(99)
            return self.send(200, "image/jpeg", data[: len(data) // 2])
        if self.path == "/page.jpg":
            return self.send(200, "text/html", b"<html><body>consent page</body></html>")
        if self.path == "/slow.jpg":
            time.sleep(TIMEOUT_S * 3)
            return self.send(200, "image/jpeg", image_bytes(98))
        return self.send(500, "text/plain", b"unexpected path")


@pytest.fixture(scope="module")
def server():
    with serve(Handler) as url:
        yield url


# -- SVO-Probes --------------------------------------------------------------------------------------------
# (pos triplet, neg triplet, negated role, pos url path, neg url path); rows 0-11 are usable.
SVO_ROWS = [
    ("child,cross,street", "lady,cross,street", "subject", "/img/0.jpg", "/img/1.jpg"),
    ("dog,sit,grass", "cat,sit,grass", "subject", "/img/2.jpg", "/img/3.jpg"),
    ("man,ride,horse", "boy,ride,horse", "subject", "/img/4.jpg", "/img/5.jpg"),
    ("girl,eat,bread", "woman,eat,bread", "subject", "/img/26.jpg", "/img/27.jpg"),
    ("child,cross,street", "child,walk,street", "verb", "/img/6.jpg", "/img/7.jpg"),
    ("dog,run,beach", "dog,sit,beach", "verb", "/img/8.jpg", "/img/9.jpg"),
    ("man,ride,bike", "man,eat,bike", "verb", "/img/10.jpg", "/img/11.jpg"),
    ("cat,sleep,bench", "cat,eat,bench", "verb", "/img/12.jpg", "/img/13.jpg"),
    ("child,cross,street", "child,cross,road", "object", "/img/14.jpg", "/img/15.jpg"),
    ("dog,sit,grass", "dog,sit,beach", "object", "/img/16.jpg", "/img/17.jpg"),
    ("man,ride,horse", "man,ride,bike", "object", "/img/18.jpg", "/img/19.jpg"),
    ("lady,sit,bench", "lady,sit,grass", "object", "/img/20.jpg", "/img/21.jpg"),
    ("boy,eat,apple", "girl,eat,apple", "subject", "/img/22.jpg", "/missing.jpg"),  # 12: 404
    ("boy,ride,bike", "woman,ride,bike", "subject", "/truncated.jpg", "/img/28.jpg"),  # 13: truncated
    ("cat,sit,road", "cat,sit,street", "object", "/img/29.jpg", "/page.jpg"),  # 14: not an image
    ("girl,run,beach", "girl,walk,beach", "verb", "/slow.jpg", "/img/30.jpg"),  # 15: timeout
    ("person,ride,horse", "man,ride,horse", "subject", "/img/23.jpg", "/img/24.jpg"),  # 16: excluded word
    ("child,cross,street", "child,walk,street", "subject", "/img/25.jpg", "/img/31.jpg"),  # 17: wrong flag
]
SVO_USABLE = 12
SVO_REASONS = {  # row -> what its two samples' exclusion reason says
    12: "negative image failed to download: HTTP 404 ({server}/missing.jpg)",
    13: "positive image failed to download: truncated image ({server}/truncated.jpg)",
    14: "negative image failed to download: not an image: PIL cannot identify the file (content-type text/html)",
    15: f"positive image failed to download: timeout after {TIMEOUT_S:g}s",
    16: "contains excluded word(s) ['person']",
    17: "differ in verb, but subj_neg says subject",
}


def write_svo_csv(path: Path, server: str) -> Path:
    rows = []
    for index, (pos, neg, role, pos_url, neg_url) in enumerate(SVO_ROWS):
        flags = {r: str(r == role) for r in ("subject", "verb", "object")}
        if index == 17:
            flags = {"subject": "True", "verb": "False", "object": "False"}
        rows.append(
            {
                "sentence": f"A {pos.split(',')[0]} doing something ({index}).",
                "pos_triplet": pos,
                "neg_triplet": neg,
                "subj_neg": flags["subject"],
                "verb_neg": flags["verb"],
                "obj_neg": flags["object"],
                "pos_url": server + pos_url,
                "neg_url": server + neg_url,
                "pos_image_id": f"p{index}",
                "neg_image_id": f"n{index}",
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(path, index=False)
    return path


# -- MIT-States ---------------------------------------------------------------------------------------------
MIT_FOLDERS = {  # folder -> image files (all valid jpgs)
    "old building": ["a.jpg", "b.jpg"],
    "new building": ["a.jpg"],
    "ancient building": ["a.jpg"],
    "small apple": ["a.jpg", "b.jpg"],
    "large apple": ["a.jpg"],
    "sliced apple": ["a.jpg"],
    "wrinkled shirt": ["a.jpg"],
    "crumpled shirt": ["a.jpg"],
    "frayed shirt": ["a.jpg"],
}
MIT_BAD = {  # sample id (under the dataset) -> the reader's reason starts with
    "adj building/a.jpg": "",  # unlabelled folder
    "shiny building/a.jpg": "",  # state in no group
    "old building/notes.txt": "notes.txt: not an image file",
    "new building/broken.jpg": "",
    "readme.txt": "file outside an '<adjective> <noun>' folder",
}


def write_mit_states(root: Path) -> Path:
    images = root / "images"
    for n, (folder, files) in enumerate(sorted(MIT_FOLDERS.items())):
        (images / folder).mkdir(parents=True)
        for k, name in enumerate(files):
            (images / folder / name).write_bytes(image_bytes(100 + 10 * n + k))
    for folder in ("adj building", "shiny building"):
        (images / folder).mkdir()
        (images / folder / "a.jpg").write_bytes(image_bytes(200))
    (images / "old building" / "notes.txt").write_text("not an image")
    (images / "new building" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (images / "readme.txt").write_text("MIT-States")
    return root


# -- FER-2013 -----------------------------------------------------------------------------------------------
def fer_pixels(seed: int) -> str:
    return " ".join(map(str, np.random.default_rng(seed).integers(0, 256, 48 * 48)))


# rows 0-20: two faces per emotion in Training (so the pool's seeded pick has a choice), one in PublicTest
FER_GOOD = [(label, usage) for usage in ("Training", "Training", "PublicTest") for label in range(7)]
FER_BAD = [  # (emotion, pixels, Usage, reason fragment)
    ("9", fer_pixels(50), "Training", "emotion '9' is not an integer 0-6"),
    ("3", "1 2 3", "Training", "3 pixel values, expected 2304"),
    ("3", fer_pixels(51), "", "Usage (split) is empty"),
]


def write_fer_csv(path: Path) -> Path:
    rows = [
        {"emotion": str(label), "pixels": fer_pixels(i), "Usage": usage} for i, (label, usage) in enumerate(FER_GOOD)
    ]
    rows += [{"emotion": e, "pixels": p, "Usage": u} for e, p, u, _ in FER_BAD]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["emotion", "pixels", "Usage"]).to_csv(path, index=False)
    return path


FER_FOLDERS = {
    ("train", "happy"): 2,
    ("train", "angry"): 2,
    ("train", "sad"): 1,
    ("train", "neutral"): 1,
    ("validation", "happy"): 1,
    ("validation", "fear"): 1,
}


def write_fer_folders(root: Path) -> Path:
    for n, ((split, emotion), count) in enumerate(sorted(FER_FOLDERS.items())):
        folder = root / "images" / split / emotion
        folder.mkdir(parents=True)
        for k in range(count):
            Image.fromarray(np.random.default_rng(300 + 10 * n + k).integers(0, 256, (48, 48), dtype=np.uint8)).save(
                folder / f"{k}.jpg"
            )
    (root / "images" / "train" / "happy" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


# -- models -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory, server):
    """Every fixture on disk: {name: path}."""
    root = tmp_path_factory.mktemp("paper_sources")
    patcher = pytest.MonkeyPatch()
    words = toy_family.toy_words
    patcher.setattr(toy_family, "toy_words", lambda: sorted(set(words()) | set(EXTRA_WORDS)))
    paths = {}
    for name, make in (("blip", blip_adapter), ("llava", llava_adapter)):
        adapter = make(seed=0)
        paths[name] = root / f"tiny-{name}"
        adapter.model.save_pretrained(paths[name])
        adapter.processor.save_pretrained(paths[name])
    patcher.undo()
    paths["sd"] = tiny_inpaint_pipeline_dir(root)
    paths["svo_probes"] = write_svo_csv(root / "raw/svo_probes/svo_probes.csv", server)
    paths["mit_states"] = write_mit_states(root / "raw/mit_states")
    paths["facial_expressions"] = write_fer_csv(root / "raw/fer2013/fer2013.csv")
    paths["facial_folders"] = write_fer_folders(root / "raw/fer_folders")
    paths["server"] = server
    return paths


def paper_config(sources: dict, seed: int = 0) -> dict:
    """config/paper.yaml with the data paths pointed at the fixtures and the models at the tiny ones."""
    config = copy.deepcopy(PAPER)
    config["seed"] = seed
    for name in ("svo_probes", "mit_states", "facial_expressions"):
        config["datasets"][name]["path"] = str(sources[name])
    for name in MODELS:
        config["models"][name]["path"] = str(sources[name])
    config["corruptions"]["sd_inpaint"]["model"] = str(sources["sd"])
    return config


def data_config(sources: dict, seed: int = 0, models: tuple[str, ...] = MODELS) -> dict:
    """The paper config made fast for CPU tests: quick downloads, float32 tiny models, a 2-step inpainting."""
    config = paper_config(sources, seed)
    config["models"] = {name: config["models"][name] for name in models}
    config["datasets"]["svo_probes"]["download"] = {"workers": 4, "timeout_s": TIMEOUT_S, "retries": 0, "backoff_s": 0}
    config["datasets"]["facial_folders"] = {
        **copy.deepcopy(config["datasets"]["facial_expressions"]),
        "path": str(sources["facial_folders"]),
    }
    config["datasets"]["facial_folders"].pop("splits")
    for name in models:
        config["models"][name].update(dtype="float32", device="cpu")
    config["corruptions"]["sd_inpaint"].update(steps=2, size=32, dtype="float32", device="cpu")
    config["gpu_jobs"] = {"threads": 1}  # two short jobs side by side on 2 cores
    return config


EVALUATED = ("svo_probes", "mit_states", "facial_expressions")


def corruptions_of(dataset: str) -> list[str]:
    return PAPER["datasets"][dataset]["corruptions"]


def answer_targets(models) -> list[str]:
    return [
        "resources/datasets/facial_folders/samples.parquet",
        "results/datasets/facial_folders/distractors.parquet",
        *(f"results/{m}/{d}/{f}" for m in models for d in EVALUATED for f in ("answers.parquet", "accuracy.csv")),
    ]


def pair_targets(models) -> list[str]:
    return [f"results/{m}/{d}/pairs/{c}.parquet" for m in models for d in EVALUATED for c in corruptions_of(d)]


def run_data_stages(workdir: Path, config: dict, pairs: list[str] | None = None) -> None:
    """Readers -> distractors -> prompts -> answers; then, as if the model were perfect, selection -> pairs.

    Tiny random models almost never answer exactly, which would leave nothing to select: after the
    real evaluation (its answers and accuracy are checked as written), every answer is marked correct and
    the workflow reruns selection and everything after it from that table: every pair manifest, or `pairs`.
    """
    configfile = write_config(workdir / "config.yaml", config)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    models = sorted(config["models"])
    first = snakemake(workdir, "--cores", "2", *answer_targets(models), configfile=configfile, env=env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for model in models:
        for dataset in EVALUATED:
            path = workdir / f"results/{model}/{dataset}/answers.parquet"
            answers = pd.read_parquet(path)
            shutil.copy(path, path.with_name("answers.real.parquet"))
            answers["correct"] = True
            answers["predicted"] = answers["answer"]
            answers.to_parquet(path, index=False)
    second = snakemake(workdir, "--cores", "2", *(pairs or pair_targets(models)), configfile=configfile, env=env)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sources) -> Path:
    work = tmp_path_factory.mktemp("paper_data")
    started = time.monotonic()
    run_data_stages(work, data_config(sources))
    print(f"data stages: {time.monotonic() - started:.0f}s")
    return work


def table(workdir: Path, path: str) -> pd.DataFrame:
    return pd.read_parquet(workdir / path)


def excluded(workdir: Path, path: str) -> dict[str, str]:
    return dict(table(workdir, path)[["sample_id", "reason"]].itertuples(index=False, name=None))


# -- the data stages ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_svo_read_and_download_reasons(workdir, sources):
    server = sources["server"]
    downloads = table(workdir, "resources/downloads/svo_probes/downloads.parquet").set_index("url")
    assert downloads.loc[server + "/missing.jpg", "reason"] == "HTTP 404"
    assert not downloads.loc[
        [server + p for p in ("/missing.jpg", "/truncated.jpg", "/page.jpg", "/slow.jpg")], "ok"
    ].any()
    good = downloads[downloads.index.str.contains("/img/")]
    assert good["ok"].all() and len(good) == 32
    for url, row in good.iterrows():  # each cached file is exactly the server's image
        assert Path(workdir / row.path).read_bytes() == image_bytes(int(re.search(r"(\d+)\.jpg", url).group(1)))

    samples = table(workdir, "resources/datasets/svo_probes/samples.parquet").set_index("sample_id")
    reasons = excluded(workdir, "results/datasets/svo_probes/read_exclusions.parquet")
    assert len(samples) + len(reasons) == 2 * len(SVO_ROWS)  # two samples (one per image) per row
    assert len(samples) == 2 * SVO_USABLE
    for row, reason in SVO_REASONS.items():
        for side in ("pos", "neg"):
            assert reason.format(server=server) in reasons[f"svo_probes_r{row:06d}_{side}"], (row, side)

    first = samples.loc["svo_probes_r000000_pos"]
    assert (first.task, first.answer, first.distractor_given, first.subject) == (
        "svo_subject",
        "child",
        "lady",
        "crossing the street",
    )
    assert first.image_path == downloads.loc[server + "/img/0.jpg", "path"]
    assert first.corrupt_triplet == "lady,cross,street"
    verb = samples.loc["svo_probes_r000004_neg"]
    assert (verb.task, verb.answer, verb.distractor_given, verb.subject) == ("svo_verb", "walking", "crossing", "child")
    pool = table(workdir, "resources/datasets/svo_probes/image_pool.parquet")
    row0 = pool[pool["pool_key"] == "svo_probes_r000000"].set_index("value")["image_path"].to_dict()
    assert row0 == {"child": first.image_path, "lady": downloads.loc[server + "/img/1.jpg", "path"]}


@pytest.mark.slow
def test_mit_states_and_fer_read_with_reasons(workdir):
    samples = table(workdir, "resources/datasets/mit_states/samples.parquet").set_index("sample_id")
    reasons = excluded(workdir, "results/datasets/mit_states/read_exclusions.parquet")
    n_files = sum(map(len, MIT_FOLDERS.values())) + len(MIT_BAD)
    assert len(samples) + len(reasons) == n_files
    assert set(reasons) == {f"mit_states/{name}" for name in MIT_BAD}
    for name, start in MIT_BAD.items():
        assert reasons[f"mit_states/{name}"] and reasons[f"mit_states/{name}"].startswith(start), name
    old = samples.loc["mit_states/old building/a.jpg"]
    assert (old.task, old.subject, old.answer, old.category, old.pool_key) == (
        "mit_states",
        "building",
        "old",
        "colour",
        "building",
    )

    fer = table(workdir, "resources/datasets/facial_expressions/samples.parquet").set_index("sample_id")
    fer_reasons = excluded(workdir, "results/datasets/facial_expressions/read_exclusions.parquet")
    assert len(fer) + len(fer_reasons) == len(FER_GOOD) + len(FER_BAD)
    for k, (*_, reason) in enumerate(FER_BAD):
        index = len(FER_GOOD) + k
        assert reason in fer_reasons[f"facial_expressions/row{index:05d}"]
    row3 = fer.loc["facial_expressions/row00003"]  # label 3 = happy, Training
    assert (row3.answer, row3.category, row3.group) == ("happy", "happy", "positive")
    assert Path(row3.image_path).parts[-3:] == ("images", "Training", "00003.png")
    decoded = np.asarray(Image.open(workdir / row3.image_path))
    assert (decoded == np.array(fer_pixels(3).split(), dtype=np.uint8).reshape(48, 48)).all()

    folders = table(workdir, "resources/datasets/facial_folders/samples.parquet")
    folder_reasons = excluded(workdir, "results/datasets/facial_folders/read_exclusions.parquet")
    assert len(folders) + len(folder_reasons) == sum(FER_FOLDERS.values()) + 1
    assert list(folder_reasons) == ["facial_folders/train/happy/broken.jpg"]
    assert sorted(folders["category"].unique()) == ["angry", "fearful", "happy", "neutral", "sad"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", [*EVALUATED, "facial_folders"])
def test_distractor_and_prompt_counts_add_up(workdir, dataset):
    samples = table(workdir, f"resources/datasets/{dataset}/samples.parquet")
    distractors = table(workdir, f"results/datasets/{dataset}/distractors.parquet")
    d_excluded = table(workdir, f"results/datasets/{dataset}/distractor_exclusions.parquet")
    assert len(distractors) + len(d_excluded) == len(samples)
    assert set(distractors["sample_id"]) | set(d_excluded["sample_id"]) == set(samples["sample_id"])
    assert (d_excluded["reason"].str.len() > 0).all()
    pool = table(workdir, f"resources/datasets/{dataset}/image_pool.parquet")
    pictured = set(zip(pool["pool_key"], pool["value"]))
    keys = samples.set_index("sample_id")["pool_key"]
    assert all((keys[s], d) in pictured for s, d in zip(distractors["sample_id"], distractors["distractor"]))
    if dataset == "svo_probes":  # the row's other image gives the distractor
        given = samples.set_index("sample_id")["distractor_given"]
        assert (distractors.set_index("sample_id")["distractor"] == given[distractors["sample_id"]].values).all()
    if dataset not in EVALUATED:
        return
    for model in MODELS:
        prompts = table(workdir, f"results/{model}/{dataset}/prompts.parquet")
        p_excluded = table(workdir, f"results/{model}/{dataset}/prompt_exclusions.parquet")
        assert len(prompts) + len(p_excluded) == len(distractors)
        assert set(prompts["sample_id"]).isdisjoint(p_excluded["sample_id"])
        real = pd.read_parquet(workdir / f"results/{model}/{dataset}/answers.real.parquet")
        assert sorted(real["sample_id"]) == sorted(prompts["sample_id"])
        accuracy = pd.read_csv(workdir / f"results/{model}/{dataset}/accuracy.csv")
        per_task = accuracy[accuracy["category"] == ALL_CATEGORIES].set_index("task")
        assert per_task["n"].to_dict() == prompts["task"].value_counts().to_dict()
        assert per_task["n_correct"].to_dict() == real.groupby("task")["correct"].sum().to_dict()


@pytest.mark.slow
def test_mit_states_distractors_follow_the_groups_and_synonyms(workdir):
    samples = table(workdir, "resources/datasets/mit_states/samples.parquet").set_index("sample_id")
    distractors = table(workdir, "results/datasets/mit_states/distractors.parquet").set_index("sample_id")
    groups = PAPER["datasets"]["mit_states"]["tasks"]["mit_states"]["groups"]
    synonyms = [set(s) for s in PAPER["datasets"]["mit_states"]["distractors"]["near_synonyms"]]
    for sample_id, row in distractors.iterrows():
        assert groups[row.distractor] == groups[row.answer] == samples.loc[sample_id, "group"]
        assert not any({row.answer, row.distractor} <= s for s in synonyms)
    # The only other states pictured: building new / ancient (ancient is old's near-synonym), shirt
    # wrinkled (crumpled's near-synonym) / frayed; states without an image of the noun are rejected.
    assert distractors.loc["mit_states/old building/a.jpg", "distractor"] == "new"
    assert distractors.loc["mit_states/crumpled shirt/a.jpg", "distractor"] == "frayed"
    rejections = table(workdir, "results/datasets/mit_states/distractor_rejections.parquet")
    crumpled = rejections[rejections["sample_id"] == "mit_states/crumpled shirt/a.jpg"].set_index("candidate")["reason"]
    assert crumpled["wrinkled"] == "near-synonym" and crumpled["crushed"] == "no image of crushed for shirt"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_pair_manifests_row_by_row(workdir, sources, model):
    server = sources["server"]
    downloads = table(workdir, "resources/downloads/svo_probes/downloads.parquet").set_index("url")["path"]
    for dataset in EVALUATED:
        selected = table(workdir, f"results/{model}/{dataset}/selected.parquet")
        assert selected["correct"].all() and not selected["sample_id"].duplicated().any()
        for corruption in corruptions_of(dataset):
            pairs = table(workdir, f"results/{model}/{dataset}/pairs/{corruption}.parquet")
            p_excluded = table(workdir, f"results/{model}/{dataset}/pairs/{corruption}.exclusions.parquet")
            draws = PAPER["corruptions"]["gn_mult"]["n_draws"] if corruption == "gn_mult" else 1
            assert len(pairs) == draws * pairs["sample_id"].nunique()
            assert pairs["sample_id"].nunique() + len(p_excluded) == len(selected), (dataset, corruption)
            assert set(pairs["sample_id"]) | set(p_excluded["sample_id"]) == set(selected["sample_id"])
            assert (p_excluded["reason"].str.len() > 0).all()
            assert set(pairs["corruption"]) <= {corruption}
            assert set(pairs["modality"]) <= {"text" if corruption == "str" else "image"}
            if corruption != "str":
                assert (pairs["corrupt_prompt"] == pairs["clean_prompt"]).all()

    sip = table(workdir, f"results/{model}/svo_probes/pairs/sip.parquet").set_index("sample_id")
    row = sip.loc["svo_probes_r000000_pos"]
    assert (row.answer, row.distractor, row.task) == ("child", "lady", "svo_subject")
    assert row.clean_image_path == downloads[server + "/img/0.jpg"]
    assert row.corrupt_image_path == downloads[server + "/img/1.jpg"]
    options = "child or the lady" if row.correct_first else "lady or the child"
    assert f"Is the {options} crossing the street?" in row.clean_prompt
    neg = sip.loc["svo_probes_r000000_neg"]  # the same row the other way round
    assert (neg.answer, neg.clean_image_path, neg.corrupt_image_path) == (
        "lady",
        row.corrupt_image_path,
        row.clean_image_path,
    )

    mit = table(workdir, f"results/{model}/mit_states/pairs/sip.parquet").set_index("sample_id")
    old = mit.loc["mit_states/old building/a.jpg"]
    assert Path(old.corrupt_image_path).parent.name == f"{old.distractor} building"
    fer = table(workdir, f"results/{model}/facial_expressions/pairs/sip.parquet").set_index("sample_id")
    happy = fer.loc["facial_expressions/row00003"]
    assert Path(happy.corrupt_image_path).parent.name == "Training"  # same split
    label = int(Path(happy.corrupt_image_path).stem)
    assert EMOTIONS[FER_GOOD[label][0]] == happy.distractor

    gn = table(workdir, f"results/{model}/svo_probes/pairs/gn_mult.parquet")
    assert (gn["clean_image_path"] == gn["corrupt_image_path"]).all()
    assert not gn[["sample_id", "noise_seed"]].duplicated().any() and (gn["noise_seed"] >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_sd_inpaint_pairs_use_the_generated_images(workdir, model):
    selected = table(workdir, f"results/{model}/svo_probes/selected.parquet")
    pool = table(workdir, f"results/{model}/svo_probes/sd_inpaint/image_pool.parquet")
    pairs = table(workdir, f"results/{model}/svo_probes/pairs/sd_inpaint.parquet").set_index("sample_id")
    assert len(pairs) == len(selected) == len(pool)  # box masks: every selected sample is inpainted
    generated = {(k, v): p for k, v, p in pool[["pool_key", "value", "image_path"]].itertuples(index=False)}
    samples = table(workdir, "resources/datasets/svo_probes/samples.parquet").set_index("sample_id")
    for sample_id, pair in pairs.iterrows():
        assert pair.corrupt_image_path == generated[(samples.loc[sample_id, "pool_key"], pair.distractor)]
        assert f"/{model}/svo_probes/sd_inpaint/images/" in pair.corrupt_image_path
        clean, corrupt = (
            np.asarray(Image.open(workdir / p).convert("RGB")) for p in (pair.clean_image_path, pair.corrupt_image_path)
        )
        mask = np.asarray(Image.open(workdir / pair.corrupt_mask_path)) > 0
        assert clean.shape == corrupt.shape and (clean[~mask] == corrupt[~mask]).all()


def option_span(ids: list[int], option: list[int]) -> range:
    starts = [i for i in range(len(ids) - len(option) + 1) if ids[i : i + len(option)] == option]
    assert len(starts) == 1, (ids, option)
    return range(starts[0], starts[0] + len(option))


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_str_pairs_line_up_token_by_token(workdir, sources, model):
    tokenizer = AutoTokenizer.from_pretrained(sources[model])
    kept = 0
    for dataset in EVALUATED:
        pairs = table(workdir, f"results/{model}/{dataset}/pairs/str.parquet")
        for pair in pairs.itertuples(index=False):
            clean, corrupt = (tokenizer(p)["input_ids"] for p in (pair.clean_prompt, pair.corrupt_prompt))
            assert len(clean) == len(corrupt), pair.sample_id
            spans = [
                option_span(clean, tokenizer(o, add_special_tokens=False)["input_ids"])
                for o in (pair.answer, pair.distractor)
            ]
            differ = {i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b}
            assert differ <= set(spans[0]) | set(spans[1]), pair.sample_id
            assert all(differ & set(span) for span in spans), pair.sample_id  # both options replaced
            kept += 1
        reasons = excluded(workdir, f"results/{model}/{dataset}/pairs/str.exclusions.parquet")
        assert all(reasons.values())
    assert kept >= 20
    if model == "blip":  # walk ##ing: no other verb option is two tokens long
        reasons = excluded(workdir, "results/blip/svo_probes/pairs/str.exclusions.parquet")
        assert "svo_probes_r000004_neg" in reasons


def manifests(model: str) -> list[str]:
    return [
        *(f"results/{model}/{d}/pairs/{c}.parquet" for d in EVALUATED for c in corruptions_of(d)),
        *(f"results/{model}/{d}/selected.parquet" for d in EVALUATED),
        *(f"resources/datasets/{d}/{t}.parquet" for d in EVALUATED for t in ("samples", "image_pool")),
        *(f"results/datasets/{d}/distractors.parquet" for d in EVALUATED),
    ]


def digests(workdir: Path, paths: list[str]) -> dict[str, str]:
    return {path: hashlib.sha256((workdir / path).read_bytes()).hexdigest() for path in paths}


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_manifests(workdir, sources, tmp_path):
    # One model is enough here (per-model outputs do not depend on the other model), and halves the time.
    model = "llava"
    again, other = tmp_path / "again", tmp_path / "other"
    seeded = {
        f"results/{model}/svo_probes/pairs/gn_mult.parquet",  # noise seeds
        f"results/{model}/mit_states/pairs/str.parquet",  # partners, answer order
        f"results/{model}/facial_expressions/pairs/sip.parquet",  # the pool's seeded picks
        "resources/datasets/facial_expressions/image_pool.parquet",
    }
    # The SVO-Probes reader has no random choice: its tables do not depend on the seed.
    unseeded = "resources/datasets/svo_probes/samples.parquet"
    # Side by side: each run leaves cores idle between its short jobs. The other seed's run stops at the
    # pair manifests compared below (no inpainting, no other pairs).
    again.mkdir()
    other.mkdir()
    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(run_data_stages, work, data_config(sources, seed, models=(model,)), pairs)
            for work, seed, pairs in ((again, 0, None), (other, 1, sorted(p for p in seeded if "/pairs/" in p)))
        ]
        for run in runs:
            run.result()
    first = digests(workdir, manifests(model))
    assert digests(again, manifests(model)) == first
    changed = {path for path, digest in digests(other, [*seeded, unseeded]).items() if digest != first[path]}
    assert changed == seeded


# -- the full paper DAG, and the errors at start ------------------------------------------------------------
def dry_run(tmp_path: Path, config: dict, env: dict | None = None):
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "paper.yaml", config), timeout=300, env=env)
    return result.returncode, result.stdout + result.stderr


def test_full_paper_dag_plans(sources, tmp_path):
    config = paper_config(sources)
    restored = copy.deepcopy(config)  # only paths differ from config/paper.yaml
    for name in EVALUATED:
        restored["datasets"][name]["path"] = PAPER["datasets"][name]["path"]
    for name in MODELS:
        restored["models"][name]["path"] = PAPER["models"][name]["path"]
    restored["corruptions"]["sd_inpaint"]["model"] = PAPER["corruptions"]["sd_inpaint"]["model"]
    assert restored == PAPER and config["selection"]["n_per_task"] == 500
    code, output = dry_run(tmp_path, config)
    assert code == 0, output[-4000:]
    for rule in (
        "download_svo_images",
        "read_dataset_svo_probes",
        "read_dataset_mit_states",
        "read_dataset_facial_expressions",
        "distractors",
        "prompts",
        "evaluate_shard",
        "select_samples",
        "inpaint_sip",
        "pairs",
        "cache_clean",
        "patch",
        "gather_patching",
        "analyse_heads",
        "report",
    ):
        assert re.search(rf"^(local)?rule {rule}:", output, re.MULTILINE), f"rule {rule} missing from the plan"
    assert "synthetic_dataset" not in output and "train_toy_model" not in output
    assert not re.search(r"^(local)?rule (circuits|circuit_overlap):", output, re.MULTILINE)  # circuits off
    for model in MODELS:
        for dataset in EVALUATED:
            for corruption in corruptions_of(dataset):
                assert f"results/{model}/{dataset}/patching/{corruption}.parquet" in output
    assert "results/blip/mit_states/patching/sd_inpaint" not in output


@pytest.mark.parametrize(
    "dataset, key_path, expected",
    [
        ("svo_probes", "svo.csv", "expected the SVO-Probes CSV file"),
        ("mit_states", "mit", "expected the MIT-States directory holding images/<adjective> <noun>/*.jpg"),
        ("facial_expressions", "fer2013.csv", "expected the FER-2013 fer2013.csv file, or a directory"),
    ],
)
def test_missing_dataset_path_stops_at_start(sources, tmp_path, dataset, key_path, expected):
    config = paper_config(sources)
    missing = str(tmp_path / "nowhere" / key_path)
    config["datasets"][dataset]["path"] = missing
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert f"datasets.{dataset}.path = {missing!r} does not exist" in output and expected in output


def test_mit_states_folder_without_images_is_named(sources, tmp_path):
    config = paper_config(sources)
    config["datasets"]["mit_states"]["path"] = str(tmp_path)
    code, output = dry_run(tmp_path, config)
    assert code != 0 and f"datasets.mit_states.path = {str(tmp_path)!r} has no images/ folder" in output


@pytest.mark.parametrize("model", MODELS)
def test_model_not_in_cache_stops_at_start(sources, tmp_path, model):
    config = paper_config(sources)
    config["models"][model]["path"] = PAPER["models"][model]["path"]  # the hub id, not cached here
    code, output = dry_run(tmp_path, config, env={"HF_HOME": str(tmp_path / "empty_hf_home")})
    assert code != 0
    assert f"models.{model}.path" in output and PAPER["models"][model]["path"] in output
    assert "not in the local Hugging Face cache" in output and "HF_HOME" in output and "local model directory" in output


def test_inpainting_model_not_in_cache_stops_at_start(sources, tmp_path):
    config = paper_config(sources)
    config["corruptions"]["sd_inpaint"]["model"] = PAPER["corruptions"]["sd_inpaint"]["model"]
    code, output = dry_run(tmp_path, config, env={"HF_HOME": str(tmp_path / "empty_hf_home")})
    assert code != 0
    assert "corruptions.sd_inpaint.model" in output and "stabilityai/stable-diffusion-2-inpainting" in output
    assert "HF_HOME" in output


def test_sd_inpaint_on_a_dataset_without_triplets_is_named(sources, tmp_path):
    config = paper_config(sources)
    config["datasets"]["mit_states"]["corruptions"] = ["sip", "sd_inpaint"]
    code, output = dry_run(tmp_path, config)
    assert code != 0 and "datasets.mit_states.corruptions has 'sd_inpaint'" in output


def test_key_of_another_kind_is_named(sources, tmp_path):
    config = paper_config(sources)
    config["datasets"]["mit_states"]["exclude_words"] = ["person"]
    code, output = dry_run(tmp_path, config)
    assert code != 0 and "datasets.mit_states.exclude_words is only for kind svo_probes" in output


def test_task_without_values_is_refused_except_for_svo(sources, tmp_path):
    config = paper_config(sources)
    del config["datasets"]["mit_states"]["tasks"]["mit_states"]["values"]
    code, output = dry_run(tmp_path, config)
    assert code != 0 and "datasets.mit_states.tasks.mit_states.values: required key missing" in output
