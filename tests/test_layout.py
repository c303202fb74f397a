import json

import pytest
import torch

from saltdiff.layout import Box, Layout, LayoutError, resolve_phrase_tokens
from saltdiff.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def tokens_at(tokenizer, prompt, positions):
    ids = tokenizer(prompt).input_ids
    return [tokenizer.convert_ids_to_tokens(ids[i]) for i in positions]


# -- Box ---------------------------------------------------------------------------------------------
def test_box_properties_and_pixels():
    b = Box("dog", [0.25, 0.5, 0.75, 1.0])
    assert b.box == (0.25, 0.5, 0.75, 1.0)
    assert (b.x0, b.y0, b.x1, b.y1) == (0.25, 0.5, 0.75, 1.0)
    assert b.width == 0.5 and b.height == 0.5 and b.area == 0.25
    assert b.to_pixels(512, 256) == (128, 128, 384, 256)
    assert hash(b) == hash(Box("dog", (0.25, 0.5, 0.75, 1.0)))


def test_box_to_pixels_never_empty():
    assert Box("dog", (0.5, 0.5, 0.501, 0.501)).to_pixels(8, 8) == (4, 4, 5, 5)


@pytest.mark.parametrize(
    "phrase, box, occurrence, match",
    [
        ("", (0, 0, 1, 1), None, "must not be empty"),
        ("   ", (0, 0, 1, 1), None, "must not be empty"),
        (3, (0, 0, 1, 1), None, "must be a string"),
        ("dog", (0, 0, 1), None, r"dog.*4 coordinates.*got 3"),
        ("dog", (0, 0, 1, 1, 1), None, r"dog.*4 coordinates.*got 5"),
        ("dog", "0,0,1,1", None, r"dog.*4 numbers"),
        ("dog", (0, 0, 1.5, 1), None, r"dog.*outside the image.*1\.5"),
        ("dog", (-0.1, 0, 1, 1), None, r"dog.*outside the image.*-0\.1"),
        ("dog", (0.5, 0, 0.5, 1), None, r"dog.*empty"),
        ("dog", (0.6, 0, 0.5, 1), None, r"dog.*empty"),
        ("dog", (0, 0.7, 1, 0.2), None, r"dog.*empty"),
        ("dog", (0, float("nan"), 1, 1), None, r"dog.*nan"),
        ("dog", (0, 0, float("inf"), 1), None, r"dog.*inf"),
        ("dog", (0, 0, "1", 1), None, r"dog.*non-numeric.*'1'"),
        ("dog", (0, 0, 1, 1), -1, r"occurrence of phrase 'dog'.*-1"),
        ("dog", (0, 0, 1, 1), 1.0, r"occurrence of phrase 'dog'"),
    ],
)
def test_box_validation(phrase, box, occurrence, match):
    with pytest.raises(LayoutError, match=match):
        Box(phrase, box, occurrence)


def test_layout_error_is_value_error():
    assert issubclass(LayoutError, ValueError)


# -- Layout container and I/O -------------------------------------------------------------------------
def test_layout_sequence_protocol():
    layout = Layout.from_pairs([("dog", (0, 0, 0.5, 0.5)), ("cat", [0.5, 0.5, 1, 1])])
    assert len(layout) == 2
    assert layout.phrases == ["dog", "cat"]
    assert layout[1].phrase == "cat"
    assert [b.phrase for b in layout] == ["dog", "cat"]
    assert layout[:1] == Layout.from_pairs([("dog", (0, 0, 0.5, 0.5))])  # a slice is a Layout
    assert layout[1:].phrases == ["cat"] and layout[::-1].phrases == ["cat", "dog"]
    assert len(Layout()) == 0 and Layout().phrases == []


def test_layout_rejects_non_boxes():
    with pytest.raises(LayoutError, match="Box instances"):
        Layout((("dog", (0, 0, 1, 1)),))
    with pytest.raises(LayoutError, match=r"pair.*'dog'"):
        Layout.from_pairs(["dog"])


def test_layout_rejects_duplicate_explicit_occurrences():
    with pytest.raises(LayoutError, match=r"duplicate boxes for one token.*occurrence 1 of phrase 'Dog'"):
        Layout((Box("dog", (0, 0, 0.5, 0.5), 1), Box("Dog", (0.5, 0.5, 1, 1), 1)))


def test_json_round_trip(tmp_path):
    layout = Layout((Box("dog", (0.1, 0.2, 0.3, 0.4)), Box("red car", (0.5, 0.5, 1.0, 0.9), occurrence=1)))
    d = layout.to_dict()
    assert d == {
        "boxes": [
            {"phrase": "dog", "box": [0.1, 0.2, 0.3, 0.4]},
            {"phrase": "red car", "box": [0.5, 0.5, 1.0, 0.9], "occurrence": 1},
        ]
    }
    assert Layout.from_dict(d) == layout
    path = tmp_path / "layout.json"
    layout.save_json(path, prompt="a dog and a red car and a red car")
    assert json.loads(path.read_text())["prompt"] == "a dog and a red car and a red car"
    assert Layout.from_json(path) == layout
    assert Layout.from_json(str(path)) == layout
    assert Layout.from_json(json.dumps(d)) == layout
    assert Layout.from_dict({"boxes": []}) == Layout() == Layout.from_json('{"boxes": []}')


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "mapping"),
        ({"boxes": [{"phrase": "dog"}]}, r"lacks \['box'\]"),
        (
            {"boxes": [{"phrase": "dog", "box": [0, 0, 1, 1], "occurence": 1}]},
            r"unknown keys \['occurence'\]",
        ),
        ({"boxes": [], "promt": "x"}, r"unknown layout keys \['promt'\]"),
        ({"boxes": "dog"}, "must be a list"),
        ({"boxes": [{"phrase": "dog", "box": [0, 0, 2, 1]}]}, r"dog.*outside"),
    ],
)
def test_from_dict_errors(data, match):
    with pytest.raises(LayoutError, match=match):
        Layout.from_dict(data)


def test_from_json_errors(tmp_path):
    with pytest.raises(LayoutError, match="cannot read layout file"):
        Layout.from_json(tmp_path / "missing.json")
    with pytest.raises(LayoutError, match="invalid layout JSON text"):
        Layout.from_json('{"boxes": [}')


# -- parse_box_spec ----------------------------------------------------------------------------------------
def test_parse_box_spec():
    assert Layout.parse_box_spec("dog=0.1,0.2,0.3,0.4") == Box("dog", (0.1, 0.2, 0.3, 0.4))
    assert Layout.parse_box_spec("red car = 0, 0.5, 1, 1") == Box("red car", (0, 0.5, 1, 1))
    # "#N" counts from 1 for users; Box.occurrence is 0-based.
    assert Layout.parse_box_spec("dog#2=0,0,1,1") == Box("dog", (0, 0, 1, 1), occurrence=1)
    assert Layout.parse_box_spec("dog#1=0,0,1,1").occurrence == 0
    layout = Layout.from_specs(["dog=0,0,0.5,0.5", "cat=0.5,0.5,1,1"])
    assert layout.phrases == ["dog", "cat"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("dog", r"invalid box spec 'dog'.*PHRASE=x0,y0,x1,y1"),
        ("=0,0,1,1", r"invalid box spec '=0,0,1,1'.*PHRASE=x0,y0,x1,y1"),
        ("dog=0,0,1", r"'dog=0,0,1'.*4 comma-separated coordinates, got 3"),
        ("dog=0,0,a,1", r"'dog=0,0,a,1'.*must be numbers.*PHRASE=x0,y0,x1,y1"),
        ("dog#0=0,0,1,1", r"invalid occurrence '0' in box spec 'dog#0=0,0,1,1'.*counts from 1"),
        ("dog#x=0,0,1,1", r"invalid occurrence 'x'"),
        ("dog=0,0,1,1.5", r"dog.*outside"),
    ],
)
def test_parse_box_spec_errors(spec, match):
    with pytest.raises(LayoutError, match=match):
        Layout.parse_box_spec(spec)


# -- masks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (16, 16), (8, 8), (8, 16)])
def test_masks_shapes_and_area(size):
    h, w = size
    layout = Layout.from_pairs(
        [("a", (0.1, 0.2, 0.6, 0.9)), ("b", (0.5, 0.0, 1.0, 0.5)), ("c", (0.0, 0.0, 1.0, 1.0))]
    )
    m = layout.masks(h, w)
    assert m.shape == (3, h, w) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    for k, box in enumerate(layout):
        area = m[k].mean().item()
        # Center sampling: each edge is off by at most half a cell.
        tol = (box.height + 1 / h) * (1 / w) + (box.width + 1 / w) * (1 / h)
        assert abs(area - box.area) <= tol
        rows = m[k].any(dim=1).nonzero().flatten()
        cols = m[k].any(dim=0).nonzero().flatten()
        # The mask is one rectangle.
        assert m[k].sum() == len(rows) * len(cols)
        assert (rows.diff() == 1).all() and (cols.diff() == 1).all()
    assert m[2].all()


def test_masks_exact_on_cell_grid():
    m = Layout.from_pairs([("dog", (0.25, 0.5, 0.75, 1.0))]).masks(8, 16)
    expected = torch.zeros(8, 16)
    expected[4:8, 4:12] = 1
    assert torch.equal(m[0], expected)


def test_masks_small_box_keeps_one_cell():
    box = Box("bird", (0.30, 0.60, 0.32, 0.61))
    m = Layout((box,)).masks(8, 8)
    assert m[0].sum() == 1
    assert m[0, int(0.605 * 8), int(0.31 * 8)] == 1
    # Thin in one direction only: one column, several rows.
    m = Layout((Box("pole", (0.50, 0.0, 0.51, 1.0)),)).masks(4, 4)
    assert m[0].sum() == 4 and m[0, :, 2].all()
    # At fine resolution the small box covers its own cells.
    assert Layout((box,)).masks(64, 64)[0].sum() >= 1


def test_masks_touching_boxes_share_no_cell():
    m = Layout.from_pairs([("a", (0, 0, 0.5, 1)), ("b", (0.5, 0, 1, 1))]).masks(7, 7)
    assert (m.sum(0) == 1).all()


def test_masks_empty_layout_device_dtype():
    m = Layout().masks(8, 16)
    assert m.shape == (0, 8, 16)
    m = Layout.from_pairs([("a", (0, 0, 1, 1))]).masks(4, 4, device="cpu", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"


@pytest.mark.parametrize("h, w", [(0, 8), (8, -1), (8.0, 8)])
def test_masks_bad_size(h, w):
    with pytest.raises(LayoutError, match="positive integer"):
        Layout().masks(h, w)


# -- token resolution ---------------------------------------------------------------------------------------
def test_single_token_phrase(tokenizer):
    assert resolve_phrase_tokens(tokenizer, "a photo of a dog", "dog") == [5]
    assert tokens_at(tokenizer, "a photo of a dog", [5]) == ["dog</w>"]


def test_multi_token_phrase(tokenizer):
    prompt = "a red car and a blue cup"
    positions = resolve_phrase_tokens(tokenizer, prompt, "blue cup")
    assert tokens_at(tokenizer, prompt, positions) == ["blue</w>", "cup</w>"]


def test_out_of_vocabulary_words(tokenizer):
    prompt = "a traffic light at the left"
    positions = resolve_phrase_tokens(tokenizer, prompt, "traffic light")
    assert len(positions) > 2  # several BPE pieces per word
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert "".join(tokens_at(tokenizer, prompt, positions)).replace("</w>", " ").strip() == "traffic light"
    traffic = resolve_phrase_tokens(tokenizer, prompt, "traffic")
    assert len(traffic) == 7 and traffic[0] == positions[0]


def test_match_starts_at_word_boundary(tokenizer):
    # "c</w>" is the last piece of "traffic": the phrase "c" must not match inside that word.
    with pytest.raises(LayoutError, match="'c' not found"):
        resolve_phrase_tokens(tokenizer, "a traffic light", "c")
    # And a vocabulary word does not match a longer word that contains it.
    with pytest.raises(LayoutError, match="'cat' not found"):
        resolve_phrase_tokens(tokenizer, "two cats", "cat")


def test_case_and_punctuation(tokenizer):
    prompt = "A photo of a Dog, and a CAT."
    assert tokens_at(tokenizer, prompt, resolve_phrase_tokens(tokenizer, prompt, "dog")) == ["dog</w>"]
    assert tokens_at(tokenizer, prompt, resolve_phrase_tokens(tokenizer, prompt, "Cat")) == ["cat</w>"]
    assert resolve_phrase_tokens(tokenizer, "a red car", "  Red  Car ") == [2, 3]


def test_repeated_words(tokenizer):
    prompt = "a dog and a cat and a dog"
    first, second = 2, 8
    assert resolve_phrase_tokens(tokenizer, prompt, "dog") == [first]
    assert resolve_phrase_tokens(tokenizer, prompt, "dog", occurrence=1) == [second]
    assert resolve_phrase_tokens(tokenizer, prompt, "dog", exclude={first}) == [second]
    layout = Layout.from_pairs([("dog", (0, 0, 0.5, 1)), ("cat", (0.3, 0, 0.6, 1)), ("dog", (0.5, 0, 1, 1))])
    assert layout.resolve_tokens(tokenizer, prompt) == [[first], [5], [second]]
    # Explicit occurrences, in any order; a box without occurrence takes the first free match.
    layout = Layout((Box("dog", (0, 0, 0.5, 1), occurrence=1), Box("dog", (0.5, 0, 1, 1))))
    assert layout.resolve_tokens(tokenizer, prompt) == [[second], [first]]
    via_spec = Layout.from_specs(["dog#2=0,0,0.5,1", "dog#1=0.5,0,1,1"])
    assert via_spec.resolve_tokens(tokenizer, prompt) == [[second], [first]]


def test_empty_layout_resolves_to_nothing(tokenizer):
    assert Layout().resolve_tokens(tokenizer, "a dog") == []


def test_error_phrase_not_found_suggests(tokenizer):
    with pytest.raises(LayoutError) as info:
        resolve_phrase_tokens(tokenizer, "a photo of a dog", "dgo")
    message = str(info.value)
    assert "'dgo' not found" in message and "'a photo of a dog'" in message and "'dog'" in message


def test_error_occurrence_missing(tokenizer):
    with pytest.raises(
        LayoutError, match=r"occurrence 2 .*'#3'.* 'dog' does not exist.*2 time\(s\).*'a dog and a dog'"
    ):
        resolve_phrase_tokens(tokenizer, "a dog and a dog", "dog", occurrence=2)
    layout = Layout((Box("cat", (0, 0, 1, 1), occurrence=1),))
    with pytest.raises(LayoutError, match=r"occurrence 1 .*'cat' does not exist.*1 time"):
        layout.resolve_tokens(tokenizer, "a cat")


def test_error_prompt_too_long():
    tok = tiny_tokenizer(model_max_length=8)
    prompt = "a red dog and a blue cat on the table"
    with pytest.raises(LayoutError, match=r"prompt is 12 tokens long.*limit of 8.*'dog'"):
        resolve_phrase_tokens(tok, prompt, "dog")
    assert resolve_phrase_tokens(tok, "a red dog on the table", "dog") == [3]  # exactly 8 tokens is fine


def test_error_duplicate_boxes(tokenizer):
    prompt = "a dog on the left"
    layout = Layout.from_pairs([("dog", (0, 0, 0.5, 1)), ("dog", (0.5, 0, 1, 1))])
    with pytest.raises(LayoutError, match=r"duplicate boxes for one token.*'dog'.*'a dog on the left'"):
        layout.resolve_tokens(tokenizer, prompt)
    layout = Layout((Box("red car", (0, 0, 0.5, 1)), Box("car", (0.5, 0, 1, 1), occurrence=0)))
    with pytest.raises(LayoutError, match=r"duplicate boxes for one token.*'car'.*'red car'.*\[3\]"):
        layout.resolve_tokens(tokenizer, "a red car")


def test_error_empty_phrase(tokenizer):
    with pytest.raises(LayoutError, match="non-empty"):
        resolve_phrase_tokens(tokenizer, "a dog", " ")


def test_resolution_uses_pipeline_tokenizer_positions(tokenizer):
    """The positions index the same ids the text encoder sees (padded to max length)."""
    prompt = "a Yellow traffic light, left of a house"
    layout = Layout.from_pairs([("yellow traffic light", (0, 0, 0.4, 1)), ("house", (0.6, 0, 1, 1))])
    padded = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    light, house = layout.resolve_tokens(tokenizer, prompt)
    assert tokenizer.decode([padded[i] for i in house]).strip() == "house"
    assert tokenizer.decode([padded[i] for i in light]).strip() == "yellow traffic light"


def test_labels_tell_repeated_phrases_apart():
    box = (0.1, 0.1, 0.4, 0.4)
    implicit = Layout.from_pairs([("red circle", box), ("blue square", box), ("red circle", box)])
    assert implicit.labels == ["red circle", "blue square", "red circle#2"]
    specs = Layout.from_specs(["red circle#2=0.5,0.5,0.9,0.9", "red circle=0.1,0.1,0.4,0.4"])
    assert specs.labels == ["red circle#2", "red circle"]  # the unnumbered box takes the first one
    assert Layout((Box("dog", box, occurrence=2),)).labels == ["dog#3"]
