"""MultiModalMoE: shapes, bad input, the routing loss formula, modality routing, checkpointing."""

import pytest
import torch

from sparsevl.classify.config import ModelConfig
from sparsevl.classify.model import MultiModalMoE, modality_experts, routing_loss
from sparsevl.model.moe import RouterOutput

LABEL_IDS = [[1, 2, 3], [1, 2, 4, 5], [6]]


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_config(**overrides):
    values = dict(img_size=8, patch_size=4, in_channels=1, embed_dim=16, num_layers=2, num_heads=2, expert_hidden_dim=24,
                  num_shared_experts=2, num_modality_specific_experts=1, top_k=2, router_dim=8, vocab_size=16, dropout=0.0)
    return ModelConfig(**{**values, **overrides})


def test_forward_shapes_and_attention():
    model = MultiModalMoE(tiny_config(), num_classes=3, label_token_ids=LABEL_IDS).eval()
    out = model(torch.rand(5, 1, 8, 8), need_weights=True)
    assert out.logits.shape == (5, 3) and out.routing_loss.ndim == 0
    last = out.attentions[-1]
    assert last["image_self"].shape == (5, 4, 4)  # 2x2 patches
    assert last["image_cross"].shape == (5, 4, 8)  # 8 label-description tokens
    assert last["text_cross"].shape == (5, 8, 4)
    torch.testing.assert_close(last["image_cross"].sum(-1), torch.ones(5, 4))


def test_wrong_image_shape_is_refused():
    model = MultiModalMoE(tiny_config(), num_classes=3, label_token_ids=LABEL_IDS)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\) do not match the model config: expected \(batch, 1, 8, 8\)"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="img_size 10 is not a multiple of patch_size 4"):
        MultiModalMoE(tiny_config(img_size=10), num_classes=3, label_token_ids=LABEL_IDS)


def test_routing_loss_is_kl_of_utilisation_to_uniform():
    probs = torch.tensor([[0.7, 0.1, 0.0, 0.2], [0.3, 0.3, 0.0, 0.4], [0.5, 0.0, 0.0, 0.5]])
    router = RouterOutput(weights=torch.ones(3, 1), indices=torch.zeros(3, 1, dtype=torch.long), logits=probs.log(), probs=probs)
    utilisation = torch.tensor([0.5, 0.4 / 3, 1.1 / 3])  # mean over tokens of the allowed experts 0, 1, 3
    expected = sum(u * torch.log(u / (1 / 3)) for u in utilisation)
    torch.testing.assert_close(routing_loss(router, [0, 1, 3]), expected)
    uniform = RouterOutput(router.weights, router.indices, router.logits, torch.full((3, 4), 0.25))
    torch.testing.assert_close(routing_loss(uniform, [0, 1, 2, 3]), torch.tensor(0.0))


def test_each_modality_uses_shared_and_its_own_experts_only():
    assert modality_experts(4, 2, 0) == [0, 1, 2, 3, 4, 5] and modality_experts(4, 2, 1) == [0, 1, 2, 3, 6, 7]
    model = MultiModalMoE(tiny_config(router_noise_std=1.0), num_classes=3, label_token_ids=LABEL_IDS).train()
    model(torch.rand(16, 1, 8, 8))
    counts = model.expert_counts()  # (layers, [image, text], experts): shared 0-1, image 2, text 3
    assert counts.shape == (2, 2, 4)
    assert counts[:, 0, 3].sum() == 0 and counts[:, 1, 2].sum() == 0
    assert counts[:, 0].sum() == 2 * 16 * 4 * 2  # layers * images * patches * top_k
    model.reset_expert_counts()
    assert model.expert_counts().sum() == 0


def test_router_keys_start_orthonormal_and_share_one_expert_pool():
    model = MultiModalMoE(tiny_config(), num_classes=3, label_token_ids=LABEL_IDS)
    moe = model.encoder.blocks[0].moe
    keys = moe.layers["image"].router.gate.expert_keys  # (experts, router_dim)
    torch.testing.assert_close(keys @ keys.T, torch.eye(4), atol=1e-5, rtol=0)
    assert moe.layers["image"].experts is moe.layers["text"].experts


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    losses, grads = [], []
    for flag in (False, True):
        torch.manual_seed(1)
        model = MultiModalMoE(tiny_config(gradient_checkpointing=flag), num_classes=3, label_token_ids=LABEL_IDS).train()
        out = model(images)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + out.routing_loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.patch_embed.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_retrieval_embeddings_are_unit_and_ignore_padding():
    model = MultiModalMoE(tiny_config(), num_classes=0).eval()
    image_emb, _ = model.encode_images(torch.rand(3, 1, 8, 8))
    ids = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    text_emb, _ = model.encode_texts(ids, mask)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    alone, _ = model.encode_texts(ids[:1, :3], mask[:1, :3])
    torch.testing.assert_close(text_emb[:1], alone, atol=1e-5, rtol=1e-5)
