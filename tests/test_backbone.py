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


def test_checkpoints_that_pad_on_the_right_are_batched_like_single_rows(tmp_path):
    """SmolLM2's tokenizer pads on the right; the rerankers read each row's last position, so a loaded
    backbone must pad on the left: batched FIRST scores equal one-row-at-a-time scores."""
    import json

    from recsys.rerank.listwise import ListwiseReranker

    bb = build_tiny(n_items=30, seed=1)
    bb.tokenizer.padding_side = "right"
    bb.model.save_pretrained(tmp_path / "ckpt")
    bb.tokenizer.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "reranker.json").write_text(json.dumps({"prompt": "tiny"}))   # keep the tiny prompts
    loaded = load_backbone(tmp_path / "ckpt")
    assert loaded.tokenizer.padding_side == "left"
    reranker = ListwiseReranker(loaded, window=5, bf16=False)
    histories, windows = [[1, 2, 3, 4, 5, 6, 7], [8]], [[11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]
    batched = reranker.first_scores(histories, windows)
    for h, w, b in zip(histories, windows, batched):
        torch.testing.assert_close(b, reranker.first_scores([h], [w])[0], atol=1e-5, rtol=1e-5)


def test_gguf_conversion_recipe_on_a_stand_in(tmp_path):
    """The GGUF conversion (drop quantization_config, fresh model, load weights, tie, save) on a tiny
    Llama standing in for the GGUF-loaded SmolLM2 (tests download nothing)."""
    bb = build_tiny(n_items=3)
    bb.model.config.quantization_config = {"quant_method": "gguf"}          # what a GGUF load leaves behind
    save_converted(bb.model, bb.tokenizer, tmp_path / "converted")
    loaded = load_backbone(tmp_path / "converted")
    assert not hasattr(loaded.model.config, "quantization_config")
    x = torch.tensor([[bb.token_id("B")]])
    torch.testing.assert_close(loaded.model(x).logits, bb.model.eval()(x).logits)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_lora_trains_only_adapters_and_merges_back():
    from recsys.llm.backbone import apply_lora

    bb = apply_lora(build_tiny(n_items=3, hidden_size=32, num_heads=2), r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.tensor([[bb.token_id("A"), bb.token_id("B")]])
    before = bb.model(x).logits.detach()
    for n, p in bb.model.named_parameters():                 # move the adapters
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    adapted = bb.model(x).logits.detach()
    merged = bb.model.merge_and_unload()
    assert not torch.allclose(before, adapted)
    torch.testing.assert_close(merged(x).logits, adapted, atol=1e-4, rtol=1e-4)
