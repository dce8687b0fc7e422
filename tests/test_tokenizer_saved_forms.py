"""A SentencePiece Llama tokenizer saved in any form mmloom meets reloads with the same ids: the stock
folder, transformers 5's save of its fast conversion (`add_prefix_space: null`), mmloom's own save;
and exports write a tokenizer.json that tokenizes as the original when a reader needs one."""

import json

from transformers import AutoTokenizer

from mmloom.processing.tokenizer import load_tokenizer, token_id
from mmloom.processing.tokenizer_files import fast_backend, save_hf4_tokenizer, save_tokenizer
from tokenizer_families import llama_sentencepiece_folder

TEXTS = ["A chat between a curious user.", "Hi there.</s>USER: What next?\nASSISTANT: Nothing.</s>",
         "two  spaces and <image>\nafter"]


def test_every_saved_form_reloads_with_the_stock_ids(tmp_path):
    stock = load_tokenizer(llama_sentencepiece_folder(tmp_path / "stock"))
    stock.add_tokens(["<image>"], special_tokens=True)
    expected = [stock(t).input_ids for t in TEXTS]
    assert expected[0][1] == stock.convert_tokens_to_ids(stock.tokenize("A")[0]) and stock.tokenize("A")[0] == "▁A"

    fast = AutoTokenizer.from_pretrained(tmp_path / "stock")  # transformers 5: a TokenizersBackend
    fast.add_tokens(["<image>"], special_tokens=True)
    save_tokenizer(fast, tmp_path / "from-fast")
    assert json.loads((tmp_path / "from-fast" / "tokenizer_config.json").read_text()).get("add_prefix_space") is None
    save_tokenizer(stock, tmp_path / "from-mmloom")
    for folder in ("from-fast", "from-mmloom"):
        again = load_tokenizer(tmp_path / folder)
        assert [again(t).input_ids for t in TEXTS] == expected, folder
        assert token_id(again, "<image>") == token_id(stock, "<image>") == len(stock) - 1, folder  # one token

    # a reader of tokenizer.json (transformers 4.x fast, Mistral folders) gets transformers' conversion
    save_hf4_tokenizer(stock, tmp_path / "hf4", json_always=True)
    backend = fast_backend(stock)
    assert (tmp_path / "hf4" / "tokenizer.json").is_file()
    assert backend.encode(TEXTS[0]).ids == expected[0]
