"""Runs in the `llamacpp` client environment (xllamacpp: a prebuilt llama.cpp with its HTTP server and
the multimodal library mtmd): loads each exported GGUF pair in llama.cpp's own server and answers, per
prompt, what llama.cpp makes of it.

Usage: python llamacpp_client.py JOB.json. The job lists cases {name, model, mmproj, prompts: [{text,
image?}], n_predict, n_probs, suppress: [ids], extra? (more prompts), messages?, tokenize?, kv_cache?,
flash_attn?}; the results (JSON, at job["out"]) give per prompt the ids llama.cpp feeds (its /tokenize of
each text piece, as mtmd tokenizes them, and the image span from the number of evaluated tokens), the
greedy tokens and the top log-probabilities of each generated position (/completion, the native endpoint,
image as a PNG in multimodal_data); the chat template's rendering of `messages` (/apply-template) and the
/tokenize ids of `tokenize`. Only the standard library and xllamacpp are used.
"""

import base64
import json
import sys
import time
import urllib.error
import urllib.request

import xllamacpp


def start(case: dict):
    params = xllamacpp.CommonParams()
    params.model.path = case["model"]
    if case.get("mmproj"):
        params.mmproj.path = case["mmproj"]
    params.n_ctx = 1024
    params.n_parallel = 1
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    params.warmup = False
    params.use_jinja = True  # /apply-template renders the GGUF's own chat template
    params.cache_ram_mib = 0
    params.port = 0  # any free port, on loopback
    if case.get("kv_cache") == "f32":  # llama.cpp's default KV cache is f16, itself a source of differences
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    if case.get("flash_attn") is not None:
        params.flash_attn_type = xllamacpp.llama_flash_attn_type(case["flash_attn"])
    server = xllamacpp.Server(params)
    url = server.listening_address
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    return server, url


def call(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise SystemExit(f"{path}: HTTP {err.code}: {err.read()[:2000]!r}") from None


def tokenize(url: str, text: str, add_special: bool) -> list[int]:
    out = call(url, "/tokenize", {"content": text, "add_special": add_special, "parse_special": True})
    return [t if isinstance(t, int) else t["id"] for t in out["tokens"]]


def run_prompt(url: str, marker: str, case: dict, prompt: dict) -> dict:
    text = prompt["text"]
    body = {"n_predict": case["n_predict"], "temperature": 0.0, "top_k": 1, "n_probs": case["n_probs"],
            "return_tokens": True, "cache_prompt": False, "samplers": ["top_k"],
            "logit_bias": [[i, False] for i in case.get("suppress", [])]}
    pieces = text.split("<image>")
    if prompt.get("image"):
        png = base64.b64encode(open(prompt["image"], "rb").read()).decode()
        body["prompt"] = {"prompt_string": marker.join(pieces), "multimodal_data": [png]}
    else:
        body["prompt"] = text
    result = call(url, "/completion", body)
    # mtmd tokenizes each text piece on its own (no special tokens added) and puts BOS first when the
    # model adds one: /tokenize of the first piece with add_special gives exactly that
    ids, text_count = [], 0
    for k, piece in enumerate(pieces):
        piece_ids = tokenize(url, piece, add_special=k == 0)
        text_count += len(piece_ids)
        if k:
            ids.append(None)  # the image span, sized below
        ids += piece_ids
    image_tokens = result["tokens_evaluated"] - text_count if len(pieces) > 1 else 0
    expanded = []
    for token in ids:
        expanded += [-1] * image_tokens if token is None else [token]
    return {
        "ids": expanded,
        "image_tokens": image_tokens,
        "tokens_evaluated": result["tokens_evaluated"],
        "generated": result["tokens"],
        "stop_type": result.get("stop_type"),
        "content": result["content"],
        "top_logprobs": [[(t["id"], t["logprob"]) for t in step["top_logprobs"]]
                         for step in result.get("completion_probabilities", [])],
    }


def main() -> None:
    job = json.load(open(sys.argv[1]))
    results = {}
    for case in job["cases"]:
        server, url = start(case)
        props = call(url, "/props")
        marker = props.get("media_marker", "<__media__>")
        out = {"props": {k: props.get(k) for k in ("bos_token", "eos_token", "model_ftype", "modalities", "build_info")},
               "prompts": [run_prompt(url, marker, case, prompt) for prompt in case["prompts"]],
               "extra": [run_prompt(url, marker, case, prompt) for prompt in case.get("extra") or []]}
        if case.get("tokenize"):
            out["tokenized"] = [tokenize(url, text, add_special=False) for text in case["tokenize"]]
        if case.get("messages"):
            out["applied"] = [call(url, "/apply-template", {"messages": m})["prompt"] for m in case["messages"]]
        results[case["name"]] = out
        del server
    results["xllamacpp"] = xllamacpp.__version__
    json.dump(results, open(job["out"], "w"))


if __name__ == "__main__":
    main()
