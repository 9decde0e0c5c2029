"""`ModelAdapter.token_groups` and flowkit.tokens: words of a prompt as positions in the text
sequence each family's network attends to, checked by decoding the pipeline's own tokens."""

from __future__ import annotations

import pytest
import torch
import tiny_pipes as tp
from tiny_pipes import one_thread  # noqa: F401  (fixture)

import flowkit
from flowkit.adapters.base import adapt
from flowkit.adapters.latent import agreed_positions
from flowkit.errors import InputError, UnsupportedError
from flowkit.text import MAX_LENGTH
from flowkit.tokens import TokenGroup, positions_in_span, word_span

FAMILIES = ["shapes", "sd", "sdxl", "sd3", "flux"]
CLIP = tp.CLIP_MAX_LENGTH  # the tiny pipelines' CLIP length (77 in the real ones)


def adapter(family: str):
    return adapt(flowkit.load("tiny") if family == "shapes" else tp.cached(family))


def sequences(family: str, pipe, text: str) -> list[tuple[int, list[int], object]]:
    """(offset, token ids, tokenizer) of each part of the attended sequence, tokenized as the
    pipeline's encode_prompt tokenizes (padding to max_length, truncation)."""

    def ids(tok, n):
        return tok(text, padding="max_length", max_length=n, truncation=True).input_ids

    if family == "shapes":
        return [(0, ids(pipe.tokenizer, MAX_LENGTH), pipe.tokenizer)]
    if family in ("sd", "sdxl"):
        return [(0, ids(pipe.tokenizer, pipe.tokenizer.model_max_length), pipe.tokenizer)]
    if family == "sd3":
        return [(0, ids(pipe.tokenizer, pipe.tokenizer_max_length), pipe.tokenizer),
                (pipe.tokenizer_max_length, ids(pipe.tokenizer_3, 256), pipe.tokenizer_3)]
    return [(0, ids(pipe.tokenizer_2, 512), pipe.tokenizer_2)]  # flux: T5 only


def norm(s: str) -> str:
    return "".join(s.lower().replace("</w>", "").replace("\u2581", "").replace("##", "").split())


def decoded(family: str, pipe, text: str, positions: tuple[int, ...]) -> list[str]:
    """The word each part of the sequence holds at `positions` (one entry per part that has some)."""
    out = []
    for offset, ids, tok in sequences(family, pipe, text):
        mine = [p - offset for p in positions if offset <= p < offset + len(ids)]
        if mine:
            assert mine == list(range(mine[0], mine[-1] + 1)), positions  # a word's tokens are contiguous
            out.append(norm(tok.decode([ids[p] for p in mine])))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_decode_to_the_words(family):
    ad = adapter(family)
    prompts = ["a red cat", "big cat red"]
    groups = ad.token_groups(prompts, words=[("cat", "red")])
    parts = 2 if family == "sd3" else 1
    for text, (group,) in zip(prompts, groups):
        assert group.words == ("cat", "red") and group.count is None
        assert decoded(family, ad.pipe, text, group.object) == ["cat"] * parts
        assert decoded(family, ad.pipe, text, group.modifiers[0]) == ["red"] * parts
    # negative control: the two prompts put the words at different positions
    assert groups[0][0].object != groups[1][0].object
    # swapping the words swaps the positions
    (swapped,), _ = ad.token_groups(prompts, words=[("red", "cat")])
    assert swapped.object == groups[0][0].modifiers[0] and swapped.modifiers == (groups[0][0].object,)


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_index_the_conditioning(family):
    """The conditioning the network attends to has the sequence length the positions assume."""
    ad = adapter(family)
    (group,), = ad.token_groups(["a red cat"], words=["cat"])
    with torch.no_grad():
        states = ad.encode(["a red cat"], None, False)["cond"]["encoder_hidden_states"]
    assert states.shape[1] == ad.text_length() > max(group.object)
    assert ad.text_length() == {"shapes": MAX_LENGTH, "sd": CLIP, "sdxl": CLIP, "sd3": CLIP + 256, "flux": 512}[family]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_clip_positions_are_the_rows_that_change(family):
    """CLIP attends causally, so swapping 'cat' for 'dog' leaves the conditioning rows before the
    word equal and changes the row at its first position: the positions are the network's rows
    (an off-by-one, e.g. forgetting the BOS token, fails)."""
    ad = adapter(family)
    (cat,), = ad.token_groups(["a red cat"], words=["cat"])
    (dog,), = ad.token_groups(["a red dog"], words=["dog"])
    first = min(cat.object)
    assert first == min(dog.object) and first > 1
    with torch.no_grad():
        rows = ad.encode(["a red cat", "a red dog"], None, False)["cond"]["encoder_hidden_states"]
    diff = (rows[0] - rows[1]).abs().amax(-1)  # per row of the conditioning

    def first_changed_row(k: int) -> bool:
        return bool(diff[:k].max() == 0 and diff[k] > 0)

    assert first_changed_row(first)
    assert not first_changed_row(first - 1) and not first_changed_row(first + 1)  # off by one either way


def test_sd3_groups_hold_clip_and_t5_positions():
    ad = adapter("sd3")
    (group,), = ad.token_groups(["a red cat"], words=["cat"])
    clip = [p for p in group.object if p < CLIP]
    t5 = [p - CLIP for p in group.object if p >= CLIP]
    assert clip == [5, 6, 7]  # BOS, a, r, e, d, then c a t (character-level tiny CLIP)
    assert t5 == [4, 5, 6]  # '\u2581a', '\u2581r' 'e' 'd', '\u2581c' 'a' 't': no BOS in T5
    # a word past CLIP's length keeps its T5 positions
    long = "a red dog next to a cat"
    (late,), = ad.token_groups([long], words=["cat"])
    assert all(p >= CLIP for p in late.object) and decoded("sd3", ad.pipe, long, late.object) == ["cat"]
    with pytest.raises(InputError, match="max_sequence_length must be"):
        ad.token_groups(["a red cat"], words=["cat"], max_sequence_length=0)
    (short,), = ad.token_groups(["a red cat"], words=["cat"], max_sequence_length=32)
    assert short.object == group.object and ad.text_length(32) == CLIP + 32


def test_repeated_word_takes_the_asked_occurrence():
    ad = adapter("flux")
    text = "a cat and a cat"
    (first,), = ad.token_groups([text], words=["cat"])
    (second,), = ad.token_groups([text], words=[[("cat", 1)]])
    assert min(second.object) > max(first.object)
    assert decoded("flux", ad.pipe, text, first.object) == decoded("flux", ad.pipe, text, second.object) == ["cat"]
    assert ad.token_groups([text], words=[[("cat", 0)]])[0][0] == first
    with pytest.raises(InputError, match=r"'cat' occurs 2 times .*occurrence 2"):
        ad.token_groups([text], words=[[("cat", 2)]])
    # whole words, any case: 'Cat' matches, 'cats' and 'scat' do not
    assert word_span("Cats scat CAT", "cat") == (10, 13)


def test_shapes_captions_parse_into_groups():
    ad = adapter("shapes")
    text = "two red circles and a blue square"
    groups, = ad.token_groups([text])
    assert [g.count for g in groups] == [2, 1]
    assert [g.words for g in groups] == [("circles", "red", "two"), ("square", "blue", "a")]
    words = [[decoded("shapes", ad.pipe, text, p)[0] for p in (g.object, *g.modifiers)] for g in groups]
    assert words == [["circles", "red", "two"], ["square", "blue", "a"]]
    # negative control: the groups in the other order give the groups in the other order
    other, = ad.token_groups(["a blue square and two red circles"])
    assert [g.words for g in other] == [("square", "blue", "a"), ("circles", "red", "two")]
    assert [g.count for g in other] == [1, 2]
    # a repeated number word: each group takes its own
    twice, = ad.token_groups(["two red circles and two blue squares"])
    assert twice[0].modifiers[1] != twice[1].modifiers[1]
    # words= works on the shapes model too (no count then)
    explicit, = ad.token_groups([text], words=[("square", "blue", "a")])
    assert explicit[0].object == groups[1].object and explicit[0].count is None


def test_explicit_positions():
    ad = adapter("sd")
    got = ad.token_groups(None, positions=[[[[5, 6, 7], [2, 3, 4]]], [[5, 2], [1]]])
    assert got == [[TokenGroup(object=(5, 6, 7), modifiers=((2, 3, 4),))],
                   [TokenGroup(object=(5,), modifiers=((2,),)), TokenGroup(object=(1,))]]
    assert ad.token_groups(["a red cat"], positions=[[[5]]]) == [[TokenGroup(object=(5,))]]
    assert ad.token_groups(None, positions=[[[torch.tensor(5)]]])[0][0].object == (5,)
    # positions index the family's whole sequence: SD3's T5 part lies past CLIP's
    assert adapter("sd3").token_groups(None, positions=[[[CLIP + 4]]])[0][0].object == (CLIP + 4,)


@pytest.mark.parametrize("call, match", [
    (lambda ad: ad.token_groups(["a red cat"], words=["dog"]), r"'dog' occurs nowhere in the prompt 'a red cat'"),
    (lambda ad: ad.token_groups(None, words=["cat"]), "prompt embeddings carry no words: pass positions="),
    (lambda ad: ad.token_groups(None), "pass positions="),
    (lambda ad: ad.token_groups(None, positions=[[[CLIP]]]), f"position {CLIP} .* outside the text sequence of {CLIP}"),
    (lambda ad: ad.token_groups(None, positions=[[[-1]]]), "outside"),
    (lambda ad: ad.token_groups(None, positions=[[[1.5]]]), "positions are integers"),
    (lambda ad: ad.token_groups(None, positions=[[[]]]), r"positions\[0\]\[0\] is empty"),
    (lambda ad: ad.token_groups(None, positions=[[[[]]]]), "a word with no positions"),
    (lambda ad: ad.token_groups(None, positions=[[5]]), r"positions\[0\]\[0\] must be a list"),
    (lambda ad: ad.token_groups(None, positions=[[["5"]]]), r"positions\[0\]\[0\] must be a list"),
    (lambda ad: ad.token_groups(["a", "b"], positions=[[[1]]]), "1 entries for 2 prompts"),
    (lambda ad: ad.token_groups(["a red cat"], words=["cat"], positions=[[[5]]]), "not both"),
    (lambda ad: ad.token_groups(["a red cat"]), "pass words="),
    (lambda ad: ad.token_groups(["a red cat"], words=[("cat", 3.0)]), "string or \\(word, occurrence"),
    (lambda ad: ad.token_groups(["a red cat"], words=["cat"], max_sequence_length=64), "no T5"),
    # the tiny CLIP holds 14 characters between BOS and EOS: 'cat' is cut off
    (lambda ad: ad.token_groups(["a red dog next to a cat"], words=["cat"]), "beyond the text encoder's 16 tokens"),
])
def test_input_errors(call, match):
    with pytest.raises(InputError, match=match):
        call(adapter("sd"))


def test_shapes_input_errors():
    ad = adapter("shapes")
    with pytest.raises(InputError, match=r"'a red cat' is not a shapes caption .*pass words="):
        ad.token_groups(["a red cat"])
    with pytest.raises(InputError, match="no T5"):
        ad.token_groups(["a red circle"], max_sequence_length=8)


def test_tokenizers_that_disagree_are_refused():
    """SDXL/SD3 join their CLIP encoders feature-wise: positions must agree across tokenizers."""
    clip, t5 = tp.clip_tokenizer(), tp.t5_tokenizer()
    text = "a red cat"
    span = word_span(text, "cat")
    assert agreed_positions([clip, tp.clip_tokenizer()], text, span, CLIP) == (5, 6, 7)
    with pytest.raises(UnsupportedError, match="different positions"):
        agreed_positions([clip, t5], text, span, CLIP)  # T5 has no BOS: its 'cat' sits one earlier
    pipe = tp.build("sdxl")
    pipe.tokenizer_2 = t5  # a second tokenizer that places words differently
    with pytest.raises(UnsupportedError, match="different positions"):
        adapt(pipe).token_groups([text], words=["cat"])


def test_positions_in_span_skips_special_tokens():
    offsets = [(0, 0), (0, 1), (0, 1), (1, 3), (4, 7), (0, 0)]
    assert positions_in_span(offsets, (0, 3)) == (1, 2, 3)
    assert positions_in_span(offsets, (0, 3), special=[1, 0, 1, 0, 0, 1]) == (1, 3)
    assert positions_in_span(offsets, (3, 4)) == ()
