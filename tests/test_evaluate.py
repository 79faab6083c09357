from types import SimpleNamespace

import pandas as pd
import pytest
from toy_adapters import blip_adapter, noise_image, one_torch_thread

from notice.files.tables import ANSWER_COLUMNS, EXCLUSION_COLUMNS, PROMPT_COLUMNS, SAMPLE_COLUMNS
from notice.method.evaluate import ALL_CATEGORIES, accuracy_table, build_prompts, evaluate, is_correct, select_samples
from notice.patching.scores import scores

TEMPLATES = {"colour": "is the {subject} {a} or {b}?", "shape": "is the {subject} a {a} or a {b}?"}
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


# First letter as "first token": red/rose and circle/cross collide on purpose.
STUB = SimpleNamespace(format_prompt=lambda q: f"Q: {q} A:", option_token_id=lambda option: ord(option[0]))


def samples(n_per_task: int = 10) -> pd.DataFrame:
    rows = []
    for task, values in (("colour", COLOURS), ("shape", SHAPES)):
        for i in range(n_per_task):
            answer = values[i % len(values)]
            rows.append(
                dict(
                    sample_id=f"{task}-{i:03d}",
                    dataset="toy",
                    task=task,
                    image_id=f"img{i}",
                    image_path=f"img{i % 3}",
                    mask_path="",
                    subject="object",
                    answer=answer,
                    category=answer,
                    group=task,
                    pool_key="k",
                )
            )
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def distractors(df: pd.DataFrame) -> pd.DataFrame:
    def pick(row):
        values = COLOURS if row.task == "colour" else SHAPES
        return values[(values.index(row.answer) + 1) % len(values)]

    return pd.DataFrame(
        {
            "sample_id": df.sample_id,
            "task": df.task,
            "answer": df.answer,
            "distractor": df.apply(pick, axis=1),
            "cosine": 0.1,
        }
    )


def test_build_prompts_balances_answer_order_per_task():
    df = samples(10)
    prompts, exclusions = build_prompts(df, distractors(df), STUB, TEMPLATES, seed=0)
    assert tuple(prompts.columns) == PROMPT_COLUMNS and tuple(exclusions.columns) == EXCLUSION_COLUMNS
    # shape: circle→square, square→triangle, triangle→cross, cross→circle: cross/circle collide.
    kept = prompts.groupby("task").size()
    assert kept["colour"] == 10 and kept["shape"] == 10 - len(exclusions)
    for _task, group in prompts.groupby("task"):
        assert abs(int(group.correct_first.sum()) - int((~group.correct_first).sum())) <= 1
    row = prompts.iloc[0]
    first, second = (row.answer, row.distractor) if row.correct_first else (row.distractor, row.answer)
    assert row.question == TEMPLATES[row.task].format(subject="object", a=first, b=second)
    assert row.prompt == f"Q: {row.question} A:"
    assert (row.answer_token_id, row.distractor_token_id) == (ord(row.answer[0]), ord(row.distractor[0]))


def test_build_prompts_is_seeded_and_independent_of_other_tasks():
    df = samples(20)
    a, _ = build_prompts(df, distractors(df), STUB, TEMPLATES, seed=1)
    b, _ = build_prompts(df.sample(frac=1, random_state=3), distractors(df), STUB, TEMPLATES, seed=1)
    assert a.equals(b)
    c, _ = build_prompts(df, distractors(df), STUB, TEMPLATES, seed=2)
    assert not a.correct_first.equals(c.correct_first)
    colour_only = df[df.task == "colour"]
    d, _ = build_prompts(colour_only, distractors(colour_only), STUB, TEMPLATES, seed=1)
    assert d.correct_first.tolist() == a[a.task == "colour"].correct_first.tolist()


def test_build_prompts_excludes_shared_first_token_and_missing_distractor():
    df = samples(4)
    dis = distractors(df)
    dis.loc[dis.sample_id == "colour-000", "distractor"] = "rose"  # red vs rose
    dis = dis[dis.sample_id != "colour-001"]
    prompts, exclusions = build_prompts(df, dis, STUB, TEMPLATES, seed=0)
    reasons = dict(zip(exclusions.sample_id, exclusions.reason))
    assert "share the first token" in reasons["colour-000"] and "'rose'" in reasons["colour-000"]
    assert reasons["colour-001"] == "no distractor"
    assert "shape-003" in reasons  # cross vs circle
    assert set(exclusions.stage) == {"prompts"}
    assert not set(reasons) & set(prompts.sample_id)
    assert len(prompts) + len(exclusions) == len(df)


def test_build_prompts_needs_a_template_per_task():
    df = samples(2)
    with pytest.raises(KeyError, match="shape"):
        build_prompts(df, distractors(df), STUB, {"colour": TEMPLATES["colour"]}, seed=0)


def test_evaluate_on_a_toy_blip():
    adapter = blip_adapter()
    df = samples(3)
    prompts, _ = build_prompts(df, distractors(df), adapter, TEMPLATES, seed=0)
    images = {f"img{i}": noise_image(i) for i in range(3)}
    answers = evaluate(adapter, prompts, images.__getitem__)
    assert tuple(answers.columns) == ANSWER_COLUMNS
    assert answers[list(PROMPT_COLUMNS)].equals(prompts)
    for row in answers.itertuples():
        inp = adapter.prepare(images[row.image_path], row.prompt)
        expected = scores(adapter.answer_logits(inp), row.answer_token_id, row.distractor_token_id)
        assert (row.ld_clean, row.p_clean) == (expected.ld, expected.p)
        assert row.predicted == adapter.generate_answer(inp)
        assert row.correct == is_correct(row.predicted, row.answer)


def test_is_correct():
    assert is_correct(" Red ", "red") and not is_correct("red car", "red")


def answers(rows: list[tuple[str, str, str, bool, bool]]) -> pd.DataFrame:
    """(sample_id, task, category, correct_first, correct) rows, other columns filled in."""
    df = pd.DataFrame(rows, columns=["sample_id", "task", "category", "correct_first", "correct"])
    for column in ANSWER_COLUMNS:
        if column not in df:
            df[column] = 0
    return df[list(ANSWER_COLUMNS)]


def test_accuracy_table_by_hand():
    df = answers(
        [
            ("a", "colour", "red", True, True),
            ("b", "colour", "red", False, False),
            ("c", "colour", "blue", True, True),
            ("d", "shape", "circle", True, False),
        ]
    )
    table = accuracy_table(df)
    assert list(table.columns) == ["task", "category", "n", "n_correct", "accuracy"]
    got = {(r.task, r.category): (r.n, r.n_correct, r.accuracy) for r in table.itertuples()}
    assert got == {
        ("colour", ALL_CATEGORIES): (3, 2, pytest.approx(2 / 3)),
        ("colour", "blue"): (1, 1, 1.0),
        ("colour", "red"): (2, 1, 0.5),
        ("shape", ALL_CATEGORIES): (1, 0, 0.0),
        ("shape", "circle"): (1, 0, 0.0),
    }
    assert table.iloc[0].category == ALL_CATEGORIES


def grid(n_per_cell: dict[tuple[str, bool], int], task: str = "colour", wrong: int = 2) -> list:
    rows = []
    for (category, first), n in n_per_cell.items():
        rows += [(f"{task}-{category}-{first}-{i}", task, category, first, True) for i in range(n)]
        rows += [(f"{task}-{category}-{first}-x{i}", task, category, first, False) for i in range(wrong)]
    return rows


def test_select_samples_balanced_seeded_no_duplicates():
    cells = {(c, f): 10 for c in COLOURS for f in (True, False)}
    df = answers(grid(cells) + grid({(s, f): 10 for s in SHAPES for f in (True, False)}, task="shape"))
    selected = select_samples(df, n_per_task=14, seed=0)
    assert tuple(selected.columns) == ANSWER_COLUMNS
    assert selected.correct.all() and not selected.sample_id.duplicated().any()
    for _, group in selected.groupby("task"):
        assert len(group) == 14
        assert group.correct_first.sum() == 7
        per_category = group.category.value_counts()
        assert per_category.max() - per_category.min() <= 1
        per_cell = group.groupby(["category", "correct_first"]).size()
        assert per_cell.max() - per_cell.min() <= 1
    assert selected.equals(select_samples(df.sample(frac=1, random_state=1), 14, seed=0))
    assert not selected.sample_id.equals(select_samples(df, 14, seed=1).sample_id)


def test_select_samples_fills_short_cells_from_the_others():
    cells = {("red", True): 1, ("red", False): 5, ("blue", True): 5, ("blue", False): 5}
    selected = select_samples(answers(grid(cells)), n_per_task=12, seed=0)
    counts = selected.groupby(["category", "correct_first"]).size().to_dict()
    assert len(selected) == 12 and counts[("red", True)] == 1
    assert sorted(v for k, v in counts.items() if k != ("red", True)) == [3, 4, 4]
    everything = select_samples(answers(grid(cells)), n_per_task=100, seed=0)
    assert len(everything) == 16  # all correct ones, never a duplicate or a wrong one
