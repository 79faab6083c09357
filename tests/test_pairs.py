import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertTokenizer

from notice.files.tables import EXCLUSION_COLUMNS, PAIR_COLUMNS, PROMPT_COLUMNS, write_table
from notice.method.pairs import gaussian_pairs, sip_pairs, str_pairs

# WordPiece vocabulary in which purple, orange, yellow, square, heart and diamond split into two
# pieces ("orange" even starts with the template's own "or"), so option lengths differ.
VOCAB = """[PAD] [UNK] [CLS] [SEP] [MASK] user : is the object shape or ? answer with one word . assistant
red blue green pink grey pur ##ple ##ange yel ##low circle star cross sq ##uare he ##art dia ##mond""".split()
TEMPLATE = "user: {question} answer with one word. assistant:"
SAMPLES = [  # (sample_id, task, subject, answer, distractor, correct_first)
    ("c1", "colour", "object", "red", "blue", True),
    ("c2", "colour", "object", "blue", "green", False),
    ("c3", "colour", "object", "green", "pink", True),
    ("c4", "colour", "object", "pink", "grey", False),
    ("c5", "colour", "object", "grey", "red", True),
    ("c6", "colour", "object", "purple", "red", True),
    ("c7", "colour", "object", "orange", "blue", True),
    ("c8", "colour", "object", "yellow", "green", False),
    ("c9", "colour", "object", "purple", "orange", True),  # 2 + 2 pieces: no partner of that length
    ("s1", "shape", "shape", "square", "circle", True),
    ("s2", "shape", "shape", "star", "heart", True),  # same total length as s1 but slots 1+2 vs 2+1
    ("s3", "shape", "shape", "diamond", "cross", True),
]
SUBJECT = {sid: subject for sid, _, subject, *_ in SAMPLES}


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> BertTokenizer:
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(path))  # `vocab_file=` would be silently ignored (transformers 5)
    assert tokenizer.tokenize("orange square") == ["or", "##ange", "sq", "##uare"]
    return tokenizer


def format_question(sample_id: str, first: str, second: str) -> str:
    return f"is the {SUBJECT[sample_id]} {first} or {second}?"


def format_prompt(question: str) -> str:
    return TEMPLATE.format(question=question)


def _prompts(first_token) -> pd.DataFrame:
    rows = []
    for sid, task, _, answer, distractor, correct_first in SAMPLES:
        first, second = (answer, distractor) if correct_first else (distractor, answer)
        question = format_question(sid, first, second)
        rows.append(
            {
                "sample_id": sid,
                "task": task,
                "category": answer,
                "image_path": f"img/{sid}.png",
                "mask_path": f"mask/{sid}.png",
                "answer": answer,
                "distractor": distractor,
                "correct_first": correct_first,
                "question": question,
                "prompt": format_prompt(question),
                "answer_token_id": first_token(answer),
                "distractor_token_id": first_token(distractor),
            }
        )
    return pd.DataFrame(rows, columns=list(PROMPT_COLUMNS))


@pytest.fixture(scope="module")
def prompts(bert) -> pd.DataFrame:
    return _prompts(lambda option: bert.convert_tokens_to_ids(bert.tokenize(option)[0]))


def _bert_str(bert, prompts, seed=0):
    return str_pairs(prompts, lambda text: bert(text)["input_ids"], format_question, format_prompt, seed)


def _option_positions(encoding_offsets, prompt: str, options: tuple[str, str]) -> set[int]:
    """Oracle from the tokenizer's own character offsets: positions of tokens inside an option."""
    start1 = prompt.index(" ", prompt.index("is the ") + len("is the ")) + 1
    start2 = start1 + len(options[0]) + len(" or ")
    spans = [(start1, start1 + len(options[0])), (start2, start2 + len(options[1]))]
    return {i for i, (a, b) in enumerate(encoding_offsets) if b > a and any(a < e and b > s for s, e in spans)}


def _options_in(prompt: str) -> tuple[str, str]:
    words = prompt.removeprefix("user: is the ").split(" ")
    return words[1], words[3].removesuffix("?")


def test_str_pairs_line_up_token_for_token(bert, prompts):
    pairs, excluded = _bert_str(bert, prompts)
    assert list(pairs.columns) == list(PAIR_COLUMNS) and list(excluded.columns) == list(EXCLUSION_COLUMNS)
    assert len(pairs) + len(excluded) == len(prompts) and not set(pairs["sample_id"]) & set(excluded["sample_id"])
    assert len(pairs) >= 8
    sample_of = {(a, d): (sid, task) for sid, task, _, a, d, _ in SAMPLES}
    for pair in pairs.itertuples():
        clean = bert(pair.clean_prompt, return_offsets_mapping=True)
        corrupt = bert(pair.corrupt_prompt, return_offsets_mapping=True)
        assert len(clean["input_ids"]) == len(corrupt["input_ids"])
        clean_options, corrupt_options = _options_in(pair.clean_prompt), _options_in(pair.corrupt_prompt)
        positions = _option_positions(clean["offset_mapping"], pair.clean_prompt, clean_options)
        assert positions == _option_positions(corrupt["offset_mapping"], pair.corrupt_prompt, corrupt_options)
        differ = {i for i, (a, b) in enumerate(zip(clean["input_ids"], corrupt["input_ids"])) if a != b}
        assert differ and differ <= positions
        # The partner's options come from another sample of the task, correct option in the correct slot.
        partner = corrupt_options if pair.correct_first else corrupt_options[::-1]
        assert sample_of[partner][0] != pair.sample_id and sample_of[partner][1] == pair.task
        assert not {pair.answer, pair.distractor} & set(partner)
        assert pair.clean_prompt.replace(clean_options[0], "").replace(
            clean_options[1], ""
        ) == pair.corrupt_prompt.replace(corrupt_options[0], "").replace(corrupt_options[1], "")
        assert (pair.corruption, pair.modality, pair.noise_seed) == ("str", "text", -1)
        assert pair.clean_image_path == pair.corrupt_image_path and pair.clean_mask_path == pair.corrupt_mask_path


def test_str_exclusions_name_the_reason(bert, prompts):
    _, excluded = _bert_str(bert, prompts)
    reasons = excluded.set_index("sample_id")["reason"]
    assert reasons["c9"] == "no equal-length option pair"
    assert reasons["s2"].startswith("no equal-length option pair with aligned tokens (2 tried")
    assert set(excluded["stage"]) == {"pairs:str"}


def test_str_deterministic_parquet_bytes_and_seeded(bert, prompts, tmp_path):
    blobs = []
    for run in range(2):
        pairs, excluded = _bert_str(bert, prompts, seed=5)
        write_table(pairs, tmp_path / f"p{run}.parquet", PAIR_COLUMNS)
        write_table(excluded, tmp_path / f"e{run}.parquet", EXCLUSION_COLUMNS)
        blobs.append(((tmp_path / f"p{run}.parquet").read_bytes(), (tmp_path / f"e{run}.parquet").read_bytes()))
    assert blobs[0] == blobs[1]
    corrupt = {seed: _bert_str(bert, prompts, seed=seed)[0]["corrupt_prompt"].tolist() for seed in range(6)}
    assert len({tuple(v) for v in corrupt.values()}) > 1


def test_str_skips_partner_whose_tokens_merge_across_the_option_boundary():
    # A tokenizer that glues "?" onto "ee" (as BPE merges can): "bee?" -> "b", "ee?".
    pieces = {"bee": ["b", "ee"], "bee?": ["b", "ee?"], "dog?": ["dog", "?"], "cow?": ["cow", "?"]}
    vocab: dict[str, int] = {}

    def tokenize(text: str) -> list[int]:
        words = [p for word in text.split() for p in pieces.get(word, [word])]
        return [101] + [vocab.setdefault(w, len(vocab) + 1000) for w in words] + [102]

    rows = [("a", "cat", "dog"), ("b", "ant", "bee"), ("c", "pig", "cow")]
    prompts = pd.DataFrame(
        [
            {
                "sample_id": sid,
                "task": "t",
                "category": a,
                "image_path": "i.png",
                "mask_path": "",
                "answer": a,
                "distractor": d,
                "correct_first": True,
                "question": f"is it {a} or {d}?",
                "prompt": f"is it {a} or {d}?",
                "answer_token_id": 0,
                "distractor_token_id": 0,
            }
            for sid, a, d in rows
        ]
    )
    pairs, excluded = str_pairs(prompts, tokenize, lambda sid, a, b: f"is it {a} or {b}?", lambda q: q, 0)
    # "is it ant or bee?" has as many tokens as "is it cat or dog?" but its "?" position changes.
    assert "ant" not in " ".join(pairs["corrupt_prompt"])
    assert pairs.set_index("sample_id").loc["a", "corrupt_prompt"] == "is it pig or cow?"
    assert excluded.set_index("sample_id")["reason"].to_dict() == {
        "b": "options do not start and end on token boundaries of the clean prompt"
    }


def test_str_with_sentencepiece_style_tokenizer_keeps_aligned_pairs():
    # Llama-like: Metaspace pre-tokenizer (the space belongs to the next word) and a BOS token.
    corpus = ["is the object red or blue ? answer with one word", "green pink grey purple orange yellow"] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>"]))
    prompts = _prompts(lambda option: tokenizer.encode(option).ids[0]).query("task == 'colour'")
    pairs, excluded = str_pairs(
        prompts, lambda text: [1] + tokenizer.encode(text).ids, format_question, format_prompt, 0
    )
    assert len(pairs) + len(excluded) == len(prompts) and len(pairs) >= 4
    for pair in pairs.itertuples():
        clean, corrupt = tokenizer.encode(pair.clean_prompt), tokenizer.encode(pair.corrupt_prompt)
        assert len(clean.ids) == len(corrupt.ids)
        positions = _option_positions(clean.offsets, pair.clean_prompt, _options_in(pair.clean_prompt))
        differ = {i for i, (a, b) in enumerate(zip(clean.ids, corrupt.ids)) if a != b}
        assert differ and differ <= positions


def test_str_formatter_mismatch_is_loud(bert, prompts):
    with pytest.raises(ValueError, match="do not rebuild"):
        str_pairs(
            prompts, lambda text: bert(text)["input_ids"], lambda sid, a, b: f"is it {a} or {b}?", format_prompt, 0
        )


def _sip_inputs(prompts):
    """Samples with pool_key "<task>-<n>", and a pool with one image per (pool_key, distractor), except:
    none for c2, and two for c3 (one of them the clean image)."""
    samples = prompts[["sample_id", "task", "distractor"]].assign(
        dataset="d", pool_key=prompts["task"] + "-" + prompts["sample_id"].str[1]
    )
    pool = [
        {
            "dataset": "d",
            "task": t,
            "pool_key": k,
            "value": v,
            "image_path": f"pool/{k}/{v}.png",
            "mask_path": f"pool/{k}/{v}_mask.png",
        }
        for t, k, v in samples[["task", "pool_key", "distractor"]].itertuples(index=False, name=None)
        if k != "colour-2"
    ]
    pool.append(
        {
            "dataset": "d",
            "task": "colour",
            "pool_key": "colour-3",
            "value": "pink",
            "image_path": "img/c3.png",
            "mask_path": "",
        }
    )
    return samples.drop(columns="distractor"), pd.DataFrame(pool)


def test_sip_uses_the_pool_image_of_the_distractor(prompts):
    samples, pool = _sip_inputs(prompts)
    pool = pool[~((pool["pool_key"] == "colour-3") & (pool["image_path"] != "img/c3.png"))]
    pairs, excluded = sip_pairs(prompts, samples, pool)
    assert len(pairs) + len(excluded) == len(prompts)
    for pair in pairs.itertuples():
        key = f"{pair.task}-{pair.sample_id[1]}"
        assert pair.corrupt_image_path == f"pool/{key}/{pair.distractor}.png"
        assert pair.corrupt_mask_path == f"pool/{key}/{pair.distractor}_mask.png"
        assert pair.clean_prompt == pair.corrupt_prompt and pair.clean_image_path == f"img/{pair.sample_id}.png"
        assert (pair.corruption, pair.modality, pair.noise_seed) == ("sip", "image", -1)
    reasons = excluded.set_index("sample_id")["reason"].to_dict()
    assert reasons == {
        "c2": "no pool image for pool_key 'colour-2' and value 'green'",
        "c3": "pool image for 'pink' is the clean image img/c3.png",
    }


def test_sip_duplicate_pool_images_are_loud(prompts):
    samples, pool = _sip_inputs(prompts)
    with pytest.raises(ValueError, match="several images"):
        sip_pairs(prompts, samples, pool)


def test_gaussian_pairs_one_row_per_draw_with_stable_seeds(prompts, tmp_path):
    pairs = gaussian_pairs(prompts, "multiplicative", 3, seed=11)
    assert len(pairs) == 3 * len(prompts) and set(pairs["corruption"]) == {"gn_mult"}
    assert (pairs["clean_image_path"] == pairs["corrupt_image_path"]).all()
    assert (pairs["clean_prompt"] == pairs["corrupt_prompt"]).all() and set(pairs["modality"]) == {"image"}
    assert pairs["noise_seed"].is_unique and (pairs["noise_seed"] >= 0).all()
    again = gaussian_pairs(prompts.iloc[::-1], "multiplicative", 3, seed=11)
    assert set(again["noise_seed"]) == set(pairs["noise_seed"])  # per (seed, sample, draw), not row order
    assert set(gaussian_pairs(prompts, "additive", 1, seed=11)["corruption"]) == {"gn_add"}
    write_table(pairs, tmp_path / "a.parquet", PAIR_COLUMNS)
    write_table(gaussian_pairs(prompts, "multiplicative", 3, seed=11), tmp_path / "b.parquet", PAIR_COLUMNS)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    with pytest.raises(ValueError):
        gaussian_pairs(prompts, "multiplicative", 0, seed=1)
