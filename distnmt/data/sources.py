"""The WMT'14 sources, one registry per language pair: archives, the files inside them, presets.

A *part* is one parallel training corpus (a pair of aligned files inside one
archive); an *eval set* is one newstest source/reference SGML pair. ``{src}`` and
``{tgt}`` in member names stand for the language codes, so one registry serves
both directions of its pair (en->fr and fr->en; en->de and de->en). The two
pairs share archives (Europarl v7, Common Crawl and News Commentary v9 hold the
fr-en and de-en files side by side; dev.tgz and test-full.tgz hold every
language's newstest SGML), so an archive's size and checksum are written once.
Checksums are those published with the archives, or computed by others from the
official downloads (TensorFlow Datasets, sacreBLEU, gluon-nlp); where none is
known, the field is None and the sha256 of what was read is still recorded in
the manifest. :func:`registry_for` picks the registry of a language pair.

How ``prepare`` finds a part under a mirror directory is in
:mod:`distnmt.data.fetch`: the extracted files (by member name, by base name,
with or without ``.gz``, or by one of the part's ``aliases``), else the archive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from distnmt.data.errors import DataError


@dataclass(frozen=True)
class Archive:
    """One downloadable file as published: where it is and how to check it."""

    name: str                       # file name, e.g. training-parallel-europarl-v7.tgz
    url: str
    size: Optional[int] = None      # bytes, where known: a cheap first check
    checksum: Optional[str] = None  # "sha256:<hex>" or "md5:<hex>", where known


@dataclass(frozen=True)
class Part:
    """One parallel training corpus: two aligned files inside an archive."""

    name: str
    archive: str                    # key into Registry.archives
    members: tuple[str, str]        # (source side, target side) member paths; {src}/{tgt} filled in
    description: str
    aliases: tuple[str, ...] = ()   # short names a mirror may use: "{alias}.{lang}[.gz]"
    pairs: Optional[int] = None     # published number of lines, for progress bars and docs


@dataclass(frozen=True)
class EvalSet:
    """A newstest set: source and reference SGML files inside an archive."""

    name: str
    archive: str
    members: tuple[str, str]        # (source SGML, reference SGML); {src}/{tgt} filled in
    segments: int
    description: str


@dataclass(frozen=True)
class Registry:
    archives: dict[str, Archive]
    parts: dict[str, Part]
    eval_sets: dict[str, EvalSet]
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The two language codes this registry's member names are written for, e.g.
    # ("en", "fr"): either may be the source side. Empty: any (a test's registry).
    langs: tuple[str, ...] = ()

    @property
    def pair(self) -> str:
        """'en-fr', 'de-en': how error messages name the registry."""
        return "-".join(self.langs) if self.langs else "any pair"

    def part(self, name: str) -> Part:
        if name not in self.parts:
            raise DataError(f"data.parts: unknown part {name!r} (known: {', '.join(self.parts)}; registry {self.pair})")
        return self.parts[name]

    def eval_set(self, name: str) -> EvalSet:
        if name not in self.eval_sets:
            raise DataError(f"data: unknown eval set {name!r} (known: {', '.join(self.eval_sets)}; registry {self.pair})")
        return self.eval_sets[name]

    def check_langs(self, src: str, tgt: str) -> None:
        """A one-line error when this registry's files are not in ``src`` and ``tgt``."""
        if self.langs and sorted((src, tgt)) != sorted(self.langs):
            raise DataError(f"data.src_lang/tgt_lang: {src}->{tgt} is not in the {self.pair} registry "
                            f"(it has {self.langs[0]}->{self.langs[1]} and {self.langs[1]}->{self.langs[0]})")

    def archive_of(self, item: Part | EvalSet) -> Archive:
        return self.archives[item.archive]

    def with_archives(self, **archives: Archive) -> "Registry":
        """A copy with some archives replaced (tests point URLs and checksums at local files)."""
        return dataclasses.replace(self, archives={**self.archives, **archives})

    def resolve_parts(self, preset: Optional[str], parts: Optional[Sequence[str]]) -> list[Part]:
        """The parts to train on: ``parts`` when given, else the preset's; at least one, no repeats."""
        if parts:
            names = list(parts)
        elif preset is not None:
            if preset not in self.presets:
                raise DataError(f"data.preset: unknown preset {preset!r} "
                                f"(known: {', '.join(self.presets)}; registry {self.pair})")
            names = list(self.presets[preset])
        else:
            raise DataError("data: choose training parts with data.preset or data.parts")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataError(f"data.parts: {', '.join(repeated)} listed more than once")
        return [self.part(n) for n in names]


def members(item: Part | EvalSet, src: str, tgt: str) -> tuple[str, str]:
    """The item's two member paths for this language direction."""
    return tuple(m.format(src=src, tgt=tgt) for m in item.members)  # type: ignore[return-value]


_ARCHIVES = [
    Archive("training-parallel-europarl-v7.tgz", "https://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz",
            657632379, "sha256:0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7"),
    Archive("training-parallel-commoncrawl.tgz", "https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz",
            918311367, "sha256:c7a74e2ea01ac6c920123108627e35278d4ccb5701e15428ffa34de86fa3a9e5"),
    Archive("training-parallel-un.tgz", "https://www.statmt.org/wmt13/training-parallel-un.tgz"),
    Archive("training-parallel-nc-v9.tgz", "https://www.statmt.org/wmt14/training-parallel-nc-v9.tgz",
            80418416, "sha256:cb8953f292298e6877ae433c98912b927cb0766b303f4540512ddd286c748485"),
    Archive("training-giga-fren.tar", "https://www.statmt.org/wmt10/training-giga-fren.tar", 2595102720),
    Archive("dev.tgz", "https://www.statmt.org/wmt14/dev.tgz"),
    Archive("test-full.tgz", "https://www.statmt.org/wmt14/test-full.tgz", None, "md5:a8cd784e006feb32ac6f3d9ec7eb389a"),
    # Schwenk's selection of the five corpora (Axelrod et al. 2011 data selection,
    # 348M words), which the paper trains on. Its text is Moses-tokenized.
    Archive("bitexts.tgz", "http://www-lium.univ-lemans.fr/~schwenk/cslm_joint_paper/data/bitexts.tgz", 1313280000),
]

_PARTS = [
    Part("europarl-v7", "training-parallel-europarl-v7.tgz",
         ("training/europarl-v7.fr-en.{src}", "training/europarl-v7.fr-en.{tgt}"),
         "Europarl v7: European Parliament proceedings (paper: 61M words)", pairs=2007723),
    Part("commoncrawl", "training-parallel-commoncrawl.tgz",
         ("commoncrawl.fr-en.{src}", "commoncrawl.fr-en.{tgt}"),
         "Common Crawl web text (paper: 90M words)", pairs=3244152),
    Part("un", "training-parallel-un.tgz",
         ("un/undoc.2000.fr-en.{src}", "un/undoc.2000.fr-en.{tgt}"),
         "UN documents 2000 (paper: 421M words)", aliases=("undoc.2000",), pairs=12886831),
    Part("news-commentary-v9", "training-parallel-nc-v9.tgz",
         ("training/news-commentary-v9.fr-en.{src}", "training/news-commentary-v9.fr-en.{tgt}"),
         "News Commentary v9 (paper: 5.5M words)", aliases=("news-commentary",), pairs=183251),
    Part("giga-fren", "training-giga-fren.tar",
         ("giga-fren.release2.fixed.{src}.gz", "giga-fren.release2.fixed.{tgt}.gz"),
         "10^9 French-English corpus, crawled (paper: 272.5M words)", pairs=22520376),
]
# The LIUM selection: one part per file of bitexts.tgz, so each is reported on its own.
_LIUM = {
    "ep7_pc45": "Europarl v7, selected 45%",
    "nc9": "News Commentary v9, all",
    "dev08_11": "newstest2008-2011 (WMT dev sets used as training data)",
    "crawl": "Common Crawl, all",
    "ccb2_pc30": "10^9 corpus (giga-fren), selected 30%",
    "un2000_pc34": "UN 2000, selected 34%",
}
_PARTS += [
    Part(f"lium-{name}", "bitexts.tgz", (f"bitexts.selected/{name}.{{src}}.gz", f"bitexts.selected/{name}.{{tgt}}.gz"),
         f"LIUM selection for the paper: {what}; Moses-tokenized")
    for name, what in _LIUM.items()
]

_EVAL_SETS = [
    EvalSet("newstest2012", "dev.tgz", ("dev/newstest2012-src.{src}.sgm", "dev/newstest2012-ref.{tgt}.sgm"), 3003,
            "WMT'12 news test set (paper: half of the dev set)"),
    EvalSet("newstest2013", "dev.tgz", ("dev/newstest2013-src.{src}.sgm", "dev/newstest2013-ref.{tgt}.sgm"), 3000,
            "WMT'13 news test set (paper: half of the dev set)"),
    EvalSet("newstest2014", "test-full.tgz",
            ("test-full/newstest2014-fren-src.{src}.sgm", "test-full/newstest2014-fren-ref.{tgt}.sgm"), 3003,
            "WMT'14 test set, 'full' release (the paper's test set)"),
]

WMT14_PARTS = ("europarl-v7", "commoncrawl", "un", "news-commentary-v9", "giga-fren")

PRESETS: dict[str, tuple[str, ...]] = {
    # All five WMT'14 En-Fr corpora as released: about 41M pairs (850M words).
    "wmt14": WMT14_PARTS,
    # The paper's training data: the same five corpora reduced to 348M words by
    # Axelrod et al.'s data selection, as Schwenk published it (tokenized text).
    "paper": tuple(f"lium-{name}" for name in _LIUM),
    # The five corpora without UN, the largest and least news-like.
    "wmt14-no-un": tuple(p for p in WMT14_PARTS if p != "un"),
    # The parts of ../shared/data/wmt14-en-fr (a few thousand lines of each).
    "sample": ("europarl-v7", "news-commentary-v9", "giga-fren"),
}

# Also under the pair's name, beside "wmt14-en-de".
PRESETS["wmt14-en-fr"] = WMT14_PARTS

REGISTRY = Registry(
    archives={a.name: a for a in _ARCHIVES},
    parts={p.name: p for p in _PARTS},
    eval_sets={e.name: e for e in _EVAL_SETS},
    presets=PRESETS,
    langs=("en", "fr"),
)
"""WMT'14 English-French (either direction)."""

# ---------------------------------------------------------------------------- English-German
#
# WMT'14 En-De trains on three corpora (no UN, no giga-fren: those are fr-en only),
# each in the same archive as its fr-en files, under "de-en" member names; the
# archive names, sizes and checksums above hold for both pairs. Member names as in
# fairseq's examples/translation/prepare-wmt14en2de.sh (its CORPORA, with the --icml17
# choice of News Commentary v9) and the statmt.org archives. Line counts of the de-en
# files as extracted: Europarl v7 1,920,209, Common Crawl 2,399,123, News Commentary v9
# 201,288, 4,520,620 in all (TensorFlow Datasets' wmt14_translate/de-en lists 4,508,785
# training examples: it filters some out).

_DE_PARTS = [
    Part("europarl-v7", "training-parallel-europarl-v7.tgz",
         ("training/europarl-v7.de-en.{src}", "training/europarl-v7.de-en.{tgt}"),
         "Europarl v7 German-English: European Parliament proceedings", pairs=1920209),
    Part("commoncrawl", "training-parallel-commoncrawl.tgz",
         ("commoncrawl.de-en.{src}", "commoncrawl.de-en.{tgt}"),
         "Common Crawl German-English web text", pairs=2399123),
    Part("news-commentary-v9", "training-parallel-nc-v9.tgz",
         ("training/news-commentary-v9.de-en.{src}", "training/news-commentary-v9.de-en.{tgt}"),
         "News Commentary v9 German-English", aliases=("news-commentary",), pairs=201288),
]

_DE_EVAL_SETS = [
    # dev.tgz holds newstest2012/2013 in every language as srcset and refset files
    # (the same segments), so the En-Fr entries serve En-De as they are.
    *(e for e in _EVAL_SETS if e.name in ("newstest2012", "newstest2013")),
    # sacreBLEU's "wmt14/full" entry names these members for en-de and de-en.
    EvalSet("newstest2014", "test-full.tgz",
            ("test-full/newstest2014-deen-src.{src}.sgm", "test-full/newstest2014-deen-ref.{tgt}.sgm"), 3003,
            "WMT'14 En-De test set, 'full' release (3003 segments; the 'filtered' one has 2737)"),
]

WMT14_EN_DE_PARTS = tuple(p.name for p in _DE_PARTS)

REGISTRY_EN_DE = Registry(
    archives={a.name: a for a in _ARCHIVES},
    parts={p.name: p for p in _DE_PARTS},
    eval_sets={e.name: e for e in _DE_EVAL_SETS},
    # All three WMT'14 En-De corpora as released: about 4.5M pairs (Luong et al.
    # 2015 and Jean et al. 2015 train on these, with newstest2014 as the test set).
    presets={"wmt14-en-de": WMT14_EN_DE_PARTS},
    langs=("en", "de"),
)
"""WMT'14 English-German (either direction)."""

REGISTRIES: dict[str, Registry] = {r.pair: r for r in (REGISTRY, REGISTRY_EN_DE)}


def registry_for(src_lang: str, tgt_lang: str) -> Registry:
    """The registry holding ``src_lang`` and ``tgt_lang`` (either direction); a one-line error listing the pairs."""
    for registry in REGISTRIES.values():
        if sorted(registry.langs) == sorted((src_lang, tgt_lang)):
            return registry
    have = ", ".join(f"{a}->{b} and {b}->{a}" for a, b in (r.langs for r in REGISTRIES.values()))
    raise DataError(f"data.src_lang/tgt_lang: no WMT'14 registry for {src_lang}->{tgt_lang} (has: {have}); "
                    "for other languages list your own files under data.corpora (docs/DATA.md, 'Your own data')")
