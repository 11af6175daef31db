"""bench/scale_cpu_stages.py: the larger corpora's copies are seeded variations of the real bills."""

from __future__ import annotations

import json
import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import scale_cpu_stages as scale  # noqa: E402

HANGUL = re.compile("[\uac00-\ud7a3]")


def test_each_copy_is_a_new_document_that_keeps_all_but_hangul_and_repeats_with_its_seed(bills_sample):
    bills = list(dict.fromkeys(json.loads(line)["text"] for line in bills_sample.read_text(encoding="utf-8").splitlines()))
    frequencies = scale.syllable_frequencies(bills)
    copies = [[b.translate(scale.variation_table(frequencies, k, 0.1, 1234)) for b in bills] for k in range(4)]

    assert copies[0] == bills
    assert len({text for copy in copies for text in copy}) == 4 * len(bills)  # none a duplicate ingest would drop
    for copy in copies[1:]:
        assert [HANGUL.sub("", t) for t in copy] == [HANGUL.sub("", b) for b in bills]
        assert set("".join(copy)) <= set("".join(bills))  # only syllables the bills have
    assert scale.variation_table(frequencies, 2, 0.1, 1234) == scale.variation_table(frequencies, 2, 0.1, 1234)
    assert scale.variation_table(frequencies, 2, 0.1, 1234) != scale.variation_table(frequencies, 2, 0.1, 99)
    replaced = len(scale.variation_table(frequencies, 1, 0.1, 1234)) / len(frequencies)
    assert 0.05 < replaced < 0.15
