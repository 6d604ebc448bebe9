"""sd-scripts' SD3 text options on the host's own text encoders and the SD3 context layout."""
import pytest
import torch

from sd3_lora_trainer.trainer import text


def test_tokens_until_end_and_t5_fit():
    assert text.tokens_until_end([49406, 5, 49407, 49407, 49407], 49407) == [True, True, True, False, False]
    pairs = [(t, 1.0) for t in [3, 9, 10, 11, 1, 0, 0]]
    assert [p[0] for p in text.fit_t5_tokens(pairs, 4)] == [3, 9, 10, 1]
    assert [p[0] for p in text.fit_t5_tokens(pairs, 8)] == [3, 9, 10, 11, 1, 0, 0, 0]


def test_drop_encoders_zeroes_each_encoders_part():
    ctx, pooled = torch.ones(64, 77 + 5, 4096), torch.ones(64, 2048)
    g = torch.Generator().manual_seed(0)
    c2, p2 = text.drop_encoders(ctx, pooled, (0.5, 0.0, 1.0), g)
    assert torch.equal(ctx, torch.ones_like(ctx))  # inputs untouched
    dropped_l = p2[:, 0] == 0
    assert 10 < dropped_l.sum() < 54  # about half
    assert torch.equal(c2[dropped_l][:, :77, :768], torch.zeros_like(c2[dropped_l][:, :77, :768]))
    assert (c2[~dropped_l][:, :77, :768] == 1).all() and (c2[:, :77, 768:2048] == 1).all()
    assert (c2[:, 77:] == 0).all() and (p2[:, 768:] == 1).all()
    assert text.drop_encoders(ctx, pooled, (0, 0, 0), g)[0] is ctx


@pytest.fixture(scope="module")
def clip(host, sd35m_checkpoint):
    with torch.inference_mode():
        return host.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(sd35m_checkpoint)[1]


def test_lg_mask_zeroes_padding_on_the_host_encoder(clip):
    from sd3_lora_trainer.nodes.text import encode_caption as encode
    with torch.no_grad():
        plain, pooled = encode(clip, "a red circle")
        masked, pooled_m = encode(clip, "a red circle", apply_lg_attn_mask=True)
        stock, stock_pooled = clip.encode_from_tokens(clip.tokenize("a red circle"), return_pooled=True)
    torch.testing.assert_close(plain, stock)  # without options: exactly the stock encoding
    torch.testing.assert_close(pooled_m, stock_pooled)
    n = 1 + 3 + 1  # start, three words, end
    torch.testing.assert_close(masked[:, :n], plain[:, :n])
    assert plain[:, n:, :768].abs().sum() > 0 and masked[:, n:].abs().sum() == 0


def test_long_captions_keep_one_clip_chunk(clip):
    from sd3_lora_trainer.nodes.text import encode_caption

    with torch.no_grad():
        cond, _ = encode_caption(clip, "word " * 120)
    assert cond.shape[1] == 77  # no T5 in this checkpoint: CLIP rows only, one chunk
