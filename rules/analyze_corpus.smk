# Stage 1b, the analyzed corpus: token frequencies, distinct pre-tokens and the training split's ids
# under the base tokenizer.


rule analyze_corpus:
    input:
        unpack(
            lambda wildcards: {
                "train": "results/corpus/domain/train.jsonl",
                "heldout": "results/corpus/domain/heldout.jsonl",
                "tokenizer": local_inputs(base_tokenizer()),
                **(
                    {
                        "general_train": "results/corpus/general/train.jsonl",
                        "general_heldout": "results/corpus/general/heldout.jsonl",
                    }
                    if has_general()
                    else {}
                ),
            }
        ),
    output:
        frequencies="results/analysis/token_frequencies.parquet",
        pretokens="results/analysis/pretokens.parquet",
        ids="results/analysis/train_ids.bin",
        offsets="results/analysis/train_offsets.npy",
        ids_meta="results/analysis/train_ids.json",
        stats="results/analysis/corpus_stats.json",
    log:
        "logs/analyze_corpus.log",
    benchmark:
        "benchmarks/analyze_corpus.tsv"
    conda:
        ENV
    threads: config["analysis"]["threads"]
    params:
        script=script("analyze_corpus.py"),
        tokenizer=base_tokenizer(),
        general=general_split_args,
        exact="--exact-pretokenizer" if config["analysis"]["exact_pretokenizer"] else "",
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --tokenizer {params.tokenizer:q}"
        " --train {input.train:q} --heldout {input.heldout:q} {params.general}"
        " --out-dir results/analysis --threads {threads} {params.exact} {params.trust} > {log:q} 2>&1"
