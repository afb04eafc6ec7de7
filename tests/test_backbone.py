import torch

from recsys.llm.backbone import END, build_tiny, load_backbone, save_converted


def test_tiny_vocabulary_tokenises_the_answer_format():
    bb = build_tiny(n_items=5, semantic_codes=[4, 4])
    ids = bb.tokenizer.encode("history: <i3> <i5> <c0_1>\nC\nA\n" + END, add_special_tokens=False)
    tokens = bb.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["history:", "<i3>", "<i5>", "<c0_1>", "\n", "C", "\n", "A", "\n", END]
    assert bb.identifier_ids(3).tolist() == [bb.token_id("A"), bb.token_id("B"), bb.token_id("C")]
    assert bb.separator_id == bb.token_id("\n") and bb.end_id == bb.token_id(END)
    out = bb.model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), len(bb.tokenizer))


def test_local_checkpoint_round_trip(tmp_path):
    """save_pretrained -> load_backbone(path): same logits (the path a converted SmolLM2 takes)."""
    bb = build_tiny(n_items=3)
    bb.model.save_pretrained(tmp_path / "ckpt")
    bb.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = load_backbone(tmp_path / "ckpt")
    x = torch.tensor([[bb.token_id("A"), bb.token_id("<i2>")]])
    torch.testing.assert_close(loaded.model(x).logits, bb.model.eval()(x).logits)


def test_gguf_conversion_recipe_on_a_stand_in(tmp_path):
    """ASSETS.md's conversion (drop quantization_config, fresh model, load weights, tie, save) on a tiny
    Llama standing in for the GGUF-loaded SmolLM2 (tests download nothing)."""
    bb = build_tiny(n_items=3)
    bb.model.config.quantization_config = {"quant_method": "gguf"}          # what a GGUF load leaves behind
    save_converted(bb.model, bb.tokenizer, tmp_path / "converted")
    loaded = load_backbone(tmp_path / "converted")
    assert not hasattr(loaded.model.config, "quantization_config")
    x = torch.tensor([[bb.token_id("B")]])
    torch.testing.assert_close(loaded.model(x).logits, bb.model.eval()(x).logits)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
