"""Data curation: every filter's rule, bad input, the report's balance, prepare -> training corpus."""

import importlib.util
import json
import random

import pytest

from llm_jax.cli import main as cli_main
from llm_jax.data.curation import Chain, ChainConfigError, Document, parse_chain
from llm_jax.data.curation import classifier, dedup, privacy, quality, toxicity
from llm_jax.data.curation.decontamination import contamination, eval_ngrams
from llm_jax.data.curation.documents import read_files, read_input

WORDS = ("river mountain forest garden window morning evening teacher student library market village "
         "harbor bridge castle meadow summer winter autumn spring letter journey history science music "
         "painting kitchen bottle candle silver golden quiet gentle bright narrow ancient modern").split()
SPAM = "buy cheap pills click here free money winner casino bonus offer deal discount".split()


def prose(seed: int, n: int = 80, words=WORDS) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n:
        sentences.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))).capitalize() + ".")
    return " ".join(sentences)


# Quality thresholds loose enough for short synthetic prose, with the repetition rules kept.
LOOSE_QUALITY = {"filter": "quality", "min_words": 20, "max_top_ngram_fraction": None,
                 "max_duplicate_ngram_fraction": {"5": 0.3}}


# ---------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("text, settings, rule", [
    ("few words here", {}, "word_count"),
    (" ".join(["a"] * 60), {}, "mean_word_length"),
    (" ".join(["#tag word"] * 40), {}, "symbol_word_ratio"),
    (" ".join(["123 456 789 word"] * 20), {}, "alpha_word_fraction"),
    ("\n".join([prose(1, 12) + " ..."] * 2 + [prose(i, 12) for i in range(2, 6)]), {"max_duplicate_line_fraction": None,
                                                                                  "min_words": 10}, "ellipsis_lines"),
    ("\n".join("- " + prose(i, 10) for i in range(8)), {"min_words": 10}, "bullet_lines"),
    ("\n".join([prose(1, 12)] * 5 + [prose(i, 12) for i in range(2, 6)]), {"min_words": 10}, "duplicate_lines"),
    ("\n\n".join([prose(1, 30)] * 3 + [prose(2, 30)]), {"max_duplicate_line_fraction": None}, "duplicate_paragraphs"),
    (prose(3, 60) + " " + "forest garden " * 40, {}, "top_2gram"),
    (prose(4, 40) + " " + ("river bridge castle meadow summer winter " * 8), {"max_top_ngram_fraction": None},
     "duplicate_5grams"),
    (prose(5, 60) + "\n" + prose(6, 300), {"max_line_chars": 1000}, "line_length"),
])
def test_each_heuristic_rule_fires(text, settings, rule):
    assert quality.check_quality(prose(9, 120), quality.QualityConfig(**settings)) is None  # clean prose passes
    removal = quality.check_quality(text, quality.QualityConfig(**settings))
    assert removal is not None and removal.rule == rule, removal


def test_privacy_scrubs_each_kind_with_typed_placeholders():
    text = ("Mail john.doe@example.com or call +1 (555) 123-4567. Card 4111 1111 1111 1111, not 4111 1111 1111 1112. "
            "Host 192.168.1.20 (not 999.1.1.1), v3.11.4 on 2024-01-05 12:30. db=postgres://admin:hunter2@db.io/app "
            'AKIAIOSFODNN7EXAMPLE api_key = "a8f5f167f44f4964e6c998dee827110c" password: "correcthorse"\n'
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----")
    out, counts = privacy.scrub(text)
    assert counts == {"email": 1, "phone": 1, "card_number": 1, "ip_address": 1, "password": 2, "api_key": 2,
                      "private_key": 1}
    for secret in ("john.doe", "555", "4111 1111 1111 1111", "192.168", "hunter2", "AKIA", "a8f5f1", "correcthorse",
                   "MIIE"):
        assert secret not in out
    for kept in ("4111 1111 1111 1112", "999.1.1.1", "v3.11.4", "2024-01-05 12:30", "postgres://admin:<PASSWORD>@db.io"):
        assert kept in out
    assert privacy.luhn_valid("79927398713") and not privacy.luhn_valid("79927398710")
    for phone in ("+14155552671", "1-800-555-0199", "+44 7700 900123", "+33 1 23 45 67 89", "(415) 555-2671",
                  "415.555.2671", "415 555 2671"):
        assert privacy.scrub(f"Call {phone}.")[0] == "Call <PHONE>.", phone
    assert privacy.scrub("The server is at 10.0.0.1.")[0] == "The server is at <IP_ADDRESS>."  # a full stop after it
    for numbers in ("Results for 2019 2020 2021 were stable.", "Scores: 12 34 56 78 90 11", "ids 1234 5678 9012"):
        assert privacy.scrub(numbers)[0] == numbers
    assert privacy.scrub(text, privacy.PrivacyConfig(kinds=("ip_address",)))[1] == {"ip_address": 1}


def test_toxicity_matches_whole_words_case_insensitively_above_a_density(tmp_path):
    (tmp_path / "words.txt").write_text("# terms\nbadword\nvery rude phrase\n")
    pattern = toxicity.term_pattern(toxicity.read_word_list(tmp_path / "words.txt"))
    cfg = toxicity.ToxicityConfig(word_list=str(tmp_path / "words.txt"), max_density=0.05)
    assert toxicity.toxic_matches("BadWord and a Very  rude phrase here", pattern, cfg) == (2, 2 / 7)
    assert toxicity.toxic_matches("badwordy notbadword " * 3, pattern, cfg) is None  # not whole words
    assert toxicity.toxic_matches("badword " + prose(1, 100), pattern, cfg) is None  # one in 100 words
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no terms"):
        toxicity.read_word_list(tmp_path / "empty.txt")


def test_classifier_separates_and_round_trips(tmp_path):
    good = [prose(i, 40) for i in range(40)]
    bad = [prose(100 + i, 40, SPAM) for i in range(40)]
    model = classifier.train_classifier(good, bad, n_features=1 << 12)
    assert all(model.score(prose(500 + i, 40)) > 0.8 for i in range(10))
    assert all(model.score(prose(600 + i, 40, SPAM)) < 0.2 for i in range(10))
    loaded = classifier.HashedNgramClassifier.load(model.save(tmp_path / "clf.npz"))
    assert loaded.score(good[0]) == pytest.approx(model.score(good[0]), abs=1e-6)


def test_exact_and_near_duplicates():
    base = prose(1, 200)
    words = base.split()
    edited = " ".join(words[:100] + ["changed"] + words[101:])  # one word of 200: Jaccard ~0.95
    cfg = dedup.NearDedupConfig()
    a, b, c = (dedup.minhash_signature(t, cfg) for t in (base, edited, prose(2, 200)))
    exact = dedup.jaccard(dedup.shingles(base, 5), dedup.shingles(edited, 5))
    assert dedup.similarity(a, b) == pytest.approx(exact) and 0.9 < exact < 1
    assert abs(dedup.estimated_jaccard(a.minhash, b.minhash) - exact) < 0.1  # ~3 standard errors
    assert dedup.similarity(a, c) < 0.3
    index = dedup.NearIndex(cfg)
    assert [index.add(0, "a", a), index.add(1, "c", c), index.add(2, "a", b)] == [None, None, "a"]  # ids may repeat
    same = dedup.ExactDedupConfig()
    assert dedup.exact_signature(base, same) == dedup.exact_signature(base.upper().replace(".", " ! "), same)
    # Combining marks are letters' vowels in Devanagari: "day" and "gift" stay apart.
    assert dedup.exact_signature("दिन", same) != dedup.exact_signature("दान", same)
    assert dedup.exact_signature(base, same) != dedup.exact_signature(edited, same)


def test_decontamination_needs_a_shared_long_ngram():
    question = "what is the boiling point of water at sea level in degrees celsius on earth"
    grams = eval_ngrams([question, "short answer"], 13, min_words=2)
    assert contamination("Trivia: What is the boiling point of water at sea level, in degrees Celsius on Earth?",
                         grams, 13) is not None
    assert contamination("what is the boiling point of water at sea level in degrees", grams, 13) is None  # 12 words
    assert contamination("the short answer is no", grams, 13, short_grams=frozenset({2})) is not None
    # By default an eval document of a few words is no evidence: "yes" must not remove every "yes".
    assert eval_ngrams(["yes", "short answer", "who wrote the first folio of hamlet"], 13) == frozenset()
    eight = "who wrote the first folio of hamlet then"
    assert eval_ngrams([eight], 13) == frozenset({eight})


# ------------------------------------------------------------------------- config errors


def test_chain_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ChainConfigError, match=r"unknown filter 'qualty'; known filters: \['classifier'"):
        parse_chain([{"filter": "qualty"}])
    with pytest.raises(ChainConfigError, match=r"unknown keys \['min_wrods'\]"):
        parse_chain([{"filter": "quality", "min_wrods": 3}])
    with pytest.raises(ChainConfigError, match="used twice"):
        parse_chain([{"filter": "privacy"}, {"filter": "privacy"}])
    two = parse_chain([{"filter": "classifier", "model": "q.npz"},  # quality, and toxicity as a classifier
                       {"filter": "classifier", "id": "toxicity_classifier", "model": "t.npz", "threshold": 0.9}])
    assert [s.id for s in two.steps] == ["classifier", "toxicity_classifier"]
    with pytest.raises(ChainConfigError, match="threshold"):
        parse_chain([{"filter": "near_dedup", "threshold": 1.5}])
    with pytest.raises(ChainConfigError, match="not both"):
        parse_chain([{"filter": "classifier", "model": "q.npz", "good": "g.txt", "bad": "b.txt"}])
    with pytest.raises(FileNotFoundError, match="word list .*missing.txt"):
        Chain(parse_chain([{"filter": "toxicity", "word_list": str(tmp_path / "missing.txt")}]))
    with pytest.raises(FileNotFoundError, match="good-example file|good"):
        Chain(parse_chain([{"filter": "classifier", "good": str(tmp_path / "g.txt"), "bad": str(tmp_path / "b.txt")}]))


# ------------------------------------------------------------------ prepare, end to end


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A directory of raw documents with every kind of problem, and the files the chain needs."""
    root = tmp_path_factory.mktemp("curation")
    docs = root / "raw"
    docs.mkdir()
    for i in range(12):
        (docs / f"good_{i:02d}.txt").write_text(prose(i) + f"\nWrite to person{i}@example.org today.\n")
    (docs / "good_03_copy.txt").write_text((docs / "good_03.txt").read_text().upper())  # exact duplicate
    words = prose(4).split()
    (docs / "good_04_near.txt").write_text(" ".join(words[:40] + ["changed"] + words[41:]) +
                                           "\nWrite to person4@example.org today.\n")  # near duplicate
    (docs / "spam.txt").write_text(prose(50, 80, SPAM))
    (docs / "toxic.txt").write_text(prose(51, 30) + " badword badword badword badword")
    (docs / "leaked.txt").write_text(prose(52, 40) + " what is the boiling point of water at sea level in degrees"
                                                     " celsius on earth")
    (docs / "short.txt").write_text("Too short to be a document. Mail short@example.org.")  # removed before privacy
    (docs / "empty.txt").write_text("  \n\n ")
    (docs / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (docs / "latin1.txt").write_bytes(("caf\xe9 " + prose(53)).encode("latin-1"))
    (docs / "huge.txt").write_text("word " * 250_000)  # one line of 1.25 M characters
    (root / "good.txt").write_text("\n".join(prose(200 + i, 30) for i in range(30)))
    (root / "bad.txt").write_text("\n".join(prose(300 + i, 30, SPAM) for i in range(30)))
    (root / "words.txt").write_text("badword\n")
    (root / "eval.jsonl").write_text(json.dumps({"text": "What is the boiling point of water at sea level in degrees"
                                                         " Celsius on Earth?"}) + "\n")
    chain = {"steps": [LOOSE_QUALITY, {"filter": "classifier", "good": "good.txt", "bad": "bad.txt",
                                       "n_features": 16384},
                       {"filter": "toxicity", "word_list": "words.txt"},
                       {"filter": "decontamination", "eval_path": "eval.jsonl"},
                       {"filter": "privacy"}, {"filter": "exact_dedup"}, {"filter": "near_dedup"}]}
    (root / "chain.json").write_text(json.dumps(chain))
    return root


EXPECTED_REMOVALS = {"input:binary": 1, "input:invalid_utf8": 1, "input:empty": 1, "input:too_long": 1,
                     "quality:word_count": 1, "classifier:below_threshold": 1, "toxicity:word_list": 1,
                     "decontamination:eval_overlap": 1, "exact_dedup:duplicate": 1, "near_dedup:near_duplicate": 1}


@pytest.fixture(scope="module")
def prepared(raw):
    out = raw / "out"
    code = cli_main(["prepare", "--input", str(raw / "raw"), "--out", str(out), "--chain", str(raw / "chain.json"),
                     "--name", "tiny"])
    assert code == 0
    return out


def test_prepare_counts_every_document_once(prepared, capsys):
    report = json.loads((prepared / "report.json").read_text())
    assert report["totals"]["input_docs"] == 22 and report["totals"]["balanced"]
    assert report["removed_by_reason"] == EXPECTED_REMOVALS
    assert report["totals"]["kept_docs"] == 22 - sum(EXPECTED_REMOVALS.values())
    privacy_step = next(s for s in report["steps"] if s["id"] == "privacy")
    assert privacy_step["counts"] == {"email": 14}  # the 12 kept and the 2 duplicates, scrubbed before dedup
    examples = next(s for s in report["steps"] if s["id"] == "exact_dedup")["removed"]["duplicate"]["examples"]
    assert examples[0]["id"] == "good_03_copy.txt" and "good_03.txt" in examples[0]["detail"]
    # Removed before the privacy step, shown in the report as privacy would have left it.
    short = next(s for s in report["steps"] if s["id"] == "quality")["removed"]["word_count"]["examples"][0]
    assert short["id"] == "short.txt" and short["text"] == "Too short to be a document. Mail <EMAIL>."
    assert "@example.org" not in (prepared / "report.json").read_text()


def test_prepared_corpus_is_what_training_reads(prepared):
    from llm_jax.config import DataConfig
    from llm_jax.data.pipeline import open_corpus, packed_batches
    from llm_jax.data.tokenizers import CharTokenizer

    corpus = open_corpus(DataConfig(source="tfds", tfds_name="tiny", data_dir=str(prepared)))
    texts = [corpus.train[i] for i in range(len(corpus.train))] + [corpus.validation[i]
                                                                    for i in range(len(corpus.validation))]
    assert len(texts) == 12 and len(corpus.validation) >= 1
    assert all("<EMAIL>" in t and "@example.org" not in t for t in texts)
    batch = next(iter(packed_batches(corpus.train, CharTokenizer.from_text("".join(texts)), seq_len=16, batch_size=2,
                                     train=True)))
    assert batch["inputs"].shape == (2, 16)


def test_prepare_reads_jsonl_and_tfds_and_counts_bad_lines(prepared, tmp_path):
    lines = [json.dumps({"text": prose(i), "id": f"doc{i}"}) for i in range(4)]
    lines += ["{not json", json.dumps({"body": "no text field"}), json.dumps(["a", "list"])]
    (tmp_path / "in.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    out = tmp_path / "from_jsonl"
    assert cli_main(["prepare", "--input", str(tmp_path / "in.jsonl"), "--out", str(out), "--chain", "web"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["removed_by_reason"] == {"input:bad_json": 2, "input:invalid_utf8": 1, "input:missing_field": 1}
    assert report["totals"]["kept_docs"] == 4
    docs = list(read_input("tiny", "tfds", data_dir=str(prepared), split="train"))
    assert docs and all("<EMAIL>" in d.text for d in docs)


def test_a_file_that_cannot_be_read_is_counted_as_unreadable(tmp_path):
    (tmp_path / "kept.txt").write_text("some text")
    docs = list(read_files([tmp_path / "vanished.txt", tmp_path / "kept.txt"], root=tmp_path, max_bytes=1000))
    assert [(d.id, d.problem, d.text) for d in docs] == [("vanished.txt", "unreadable", ""), ("kept.txt", None, "some text")]


def test_an_enormous_jsonl_line_is_counted_without_being_read_whole(tmp_path):
    huge = json.dumps({"text": "word " * 20_000}).encode()
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "before"}\n' + huge + b'\n{"text": "after"}\n' + huge)
    docs = list(read_input(tmp_path / "in.jsonl", max_bytes=1000))
    assert [(d.text, d.problem, d.size_bytes) for d in docs] == [
        ("before", None, 19), ("", "too_large", len(huge) + 1), ("after", None, 18), ("", "too_large", len(huge))]


def test_prepare_refuses_bad_setups_before_reading(raw, tmp_path, capsys):
    (tmp_path / "typo.json").write_text(json.dumps([{"filter": "dedupe"}]))
    assert cli_main(["prepare", "--input", str(raw / "raw"), "--out", str(tmp_path / "o"),
                     "--chain", str(tmp_path / "typo.json")]) == 2
    assert "unknown filter 'dedupe'; known filters" in capsys.readouterr().err
    (tmp_path / "nolist.json").write_text(json.dumps([{"filter": "toxicity", "word_list": "nope.txt"}]))
    assert cli_main(["prepare", "--input", str(raw / "raw"), "--out", str(tmp_path / "o"),
                     "--chain", str(tmp_path / "nolist.json")]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    assert cli_main(["prepare", "--input", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    # Settings only the end of a run would use are refused before it starts.
    refused = [(["--name", "Not-A-Name"], "name must be lowercase"),
               (["--validation-fraction", "0"], "validation_fraction must be in"),
               (["--workers", "0"], "workers must be a positive int")]
    if importlib.util.find_spec("apache_beam") is None:
        refused.append((["--runner", "beam"], "--runner beam needs the beam extra"))
    for flags, message in refused:
        assert cli_main(["prepare", "--input", str(raw / "raw"), "--out", str(tmp_path / "o"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------- runners agree, errors


def _docs(n: int = 60) -> list[Document]:
    texts = [prose(i, 40) + f" Call 555-123-{1000 + i}." for i in range(n)]
    texts += [texts[3].lower(), texts[7] + " and one more", "tiny"]
    return [Document(f"d{i:03d}", t, i, len(t)) for i, t in enumerate(texts)]


CHAIN = [LOOSE_QUALITY, {"filter": "privacy"}, {"filter": "exact_dedup"}, {"filter": "near_dedup"}]


def test_a_document_removed_after_dedup_does_not_remove_its_near_copy(tmp_path):
    (tmp_path / "words.txt").write_text("badword\n")
    text = prose(3, 200)
    chain = Chain(parse_chain([{"filter": "near_dedup"},
                               {"filter": "toxicity", "word_list": str(tmp_path / "words.txt"), "max_density": 0.05}]))
    docs = [Document("toxic", text + " badword" * 20, 0), Document("clean", text, 1)]
    assert [d.id for d in chain.run(docs)] == ["clean"]


def test_the_code_preset_keeps_programs_that_differ_in_punctuation():
    from llm_jax.data.curation.config import load_chain

    chain = Chain(load_chain("code"))
    programs = ["def add(a, b):\n    return a + b\n" * 6, "def add(a, b):\n    return a - b\n" * 6]
    exact = next(s for s in chain.steps if s.filter == "exact_dedup")
    assert exact.signature(programs[0]) != exact.signature(programs[1])


def test_worker_processes_give_the_same_result():
    one = Chain(parse_chain(CHAIN))
    kept_one = [(d.id, d.text) for d in one.run(_docs())]
    two = Chain(parse_chain(CHAIN))
    kept_two = [(d.id, d.text) for d in two.run(_docs(), workers=2, batch_size=8)]
    assert kept_two == kept_one and len(kept_one) == 60
    report_one, report_two = one.report.to_dict(), two.report.to_dict()
    assert report_two["steps"] == report_one["steps"] and report_one["totals"]["balanced"]


def test_a_step_that_raises_removes_only_that_document():
    chain = Chain(parse_chain(CHAIN))
    check = chain.steps[1].check

    def flaky(text):
        if "Call 555-123-1005" in text:
            raise RuntimeError("boom")
        return check(text)

    chain.steps[1].check = flaky
    kept = list(chain.run(_docs()))
    assert len(kept) == 59
    assert chain.report.to_dict()["removed_by_reason"]["quality:error"] == 1
    assert "RuntimeError: boom" in chain.report.steps[1].removed["error"].examples[0]["detail"]


def test_beam_pipeline_matches_the_local_runner(raw, prepared, tmp_path):
    pytest.importorskip("apache_beam")  # the beam extra (see setup.cfg: not in the test environment)
    from llm_jax.data.curation.beam import run_beam

    local = Chain(parse_chain(CHAIN))
    kept = [d.text for d in local.run(_docs())]
    texts, report = run_beam(Chain(parse_chain(CHAIN)), _docs())
    assert texts == kept
    assert report.to_dict()["steps"] == local.report.to_dict()["steps"]
    # The whole command, every filter and bad input included, on the DirectRunner.
    assert cli_main(["prepare", "--input", str(raw / "raw"), "--out", str(tmp_path), "--chain", str(raw / "chain.json"),
                     "--name", "tiny", "--runner", "beam"]) == 0
    beam_report = json.loads((tmp_path / "report.json").read_text())
    local_report = json.loads((prepared / "report.json").read_text())
    assert beam_report["steps"] == local_report["steps"] and beam_report["totals"] == local_report["totals"]
