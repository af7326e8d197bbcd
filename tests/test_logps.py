"""token_logps against an independent naive computation: values, gradients, padding, dtype."""
import math

import torch
import torch.nn.functional as F

from common import token_logps
from machinery.packing import collate_pairs
from conftest import tiny_llama


def naive_logps(model, ids: list[int]) -> torch.Tensor:
    """One unpadded sequence, default positions, full float32 log_softmax + gather: (T-1,)."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits.float()  # (1, T, V)
    return F.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None]).squeeze(-1)


def batch(seqs, left: bool, pad=0):
    T = max(map(len, seqs))
    ids = [([pad] * (T - len(s)) + s) if left else (s + [pad] * (T - len(s))) for s in seqs]
    mask = [([0] * (T - len(s)) + [1] * len(s)) if left else ([1] * len(s) + [0] * (T - len(s)))
            for s in seqs]
    return torch.tensor(ids), torch.tensor(mask)


SEQS = [[1, 5, 9, 13, 7, 2], [1, 44, 3], [1, 8, 8, 8, 8, 8, 8, 8, 8, 30]]


def test_values_match_naive_with_left_and_right_padding():
    model = tiny_llama(vocab=97)
    for left in (False, True):
        ids, mask = batch(SEQS, left)
        out = token_logps(model, {"input_ids": ids, "attention_mask": mask})
        assert out.dtype == torch.float32 and out.shape == (3, ids.shape[1] - 1)
        for b, s in enumerate(SEQS):
            ref = naive_logps(model, s)
            got = out[b][(mask[b, :-1] * mask[b, 1:]).bool()]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert torch.all(out[~(mask[:, :-1] * mask[:, 1:]).bool()] == 0)  # padding scores 0


def test_small_chunks_and_gradients_match_naive():
    model = tiny_llama(vocab=97, seed=1)
    ids, mask = batch(SEQS, left=False)
    w = torch.randn(3, ids.shape[1] - 1)  # an arbitrary weighted reduction, like cDPO's
    out = token_logps(model, {"input_ids": ids, "attention_mask": mask}, chunk_bytes=4 * 97)
    (out * w).sum().backward()  # 1 position/chunk
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for b, s in enumerate(SEQS):
        total = total + (naive_logps(model, s) * w[b, :len(s) - 1]).sum()
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_label_shift_is_one_token():
    """Hand-check on a model whose logits we control: position t must score token t+1."""
    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            V = 5
            logits = torch.zeros(*input_ids.shape, V)
            logits[..., 3] = math.log(4.0)  # p(3) = 4/8, every other token 1/8
            return type("Out", (), {"logits": logits})()
    ids = torch.tensor([[0, 3, 1]])
    out = token_logps(Fixed(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), math.log(1 / 8)]]))


def test_collate_pairs_aligns_weights_with_their_tokens():
    """The weight of response token j must land on the log-prob column that scores token j."""
    pair = {"prompt_ids": [1, 10, 11], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 2],
            "chosen_weights": [0.1, 0.2, 0.3], "rejected_weights": [0.7, 0.9]}
    b = collate_pairs([pair], pad_id=0)
    targets = b["input_ids"][:, 1:]  # what each log-prob column scores
    assert targets[0][b["loss_mask"][0].bool()].tolist() == [20, 21, 2]
    assert targets[1][b["loss_mask"][1].bool()].tolist() == [30, 2]
    cols = b["weights"][1].nonzero().flatten()
    assert targets[1, cols].tolist() == [30, 2]
    torch.testing.assert_close(b["weights"][1, cols], torch.tensor([0.7, 0.9]))
    torch.testing.assert_close(b["weights"][0][b["loss_mask"][0].bool()],
                               torch.tensor([0.1, 0.2, 0.3]))
