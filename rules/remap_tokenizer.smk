# Stage 3b, the remapped tokenizer and what it saves (compression.json).


rule remap_tokenizer:
    input:
        unpack(remap_inputs),
    output:
        tokenizer=directory("results/tokenizer/remapped"),
        compression="results/remap/compression.json",
    log:
        "logs/remap_tokenizer.log",
    benchmark:
        "benchmarks/remap_tokenizer.tsv"
    conda:
        ENV
    params:
        script=script("remap_tokenizer.py"),
        tokenizer=base_tokenizer(),
        extra=remap_args,
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --rules {input.rules:q} --candidates {input.candidates:q}"
        " --base-tokenizer {params.tokenizer:q} --pretokens {input.pretokens:q}"
        " --heldout {input.heldout:q} {params.extra} {params.trust}"
        " --out {output.tokenizer:q} --compression-out {output.compression:q} > {log:q} 2>&1"
