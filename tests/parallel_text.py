"""Small synthetic parallel text for the tests of other language pairs and of a user's own files.

There is no German (or any non-French) sample under ../shared, so these tests make
their own: sentences drawn from a word-for-word dictionary (so a pair really is a
translation a tiny model can start to learn), with non-ASCII letters, and WMT-style
SGML wrapping of the same text.
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from pathlib import Path

# The same meaning at the same index in every language.
WORDS = {
    "en": "the house is small big green old new we see a cat dog tree street city water bread good very "
          "today tomorrow day night book school child woman man friend".split(),
    "de": "das haus ist klein groß grün alt neu wir sehen eine katze hund baum straße stadt wasser brot gut sehr "
          "heute morgen tag nacht buch schule kind frau mann freund".split(),
    "fr": "la maison est petite grande verte vieille neuve nous voyons un chat chien arbre rue ville eau pain bon très "
          "aujourd'hui demain jour nuit livre école enfant femme homme ami".split(),
    "xx": "ka maru te lo pi sen nori va kel du mo isa ren tak fu wen ol pra sim ek "
          "zu ba ko ne tiri hap sole yon kiva ru".split(),  # a made-up language: any code works
}


def pairs(n: int, src: str, tgt: str, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` aligned sentences of 3-12 words, capitalised and with a full stop."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        idx = [rng.randrange(len(WORDS["en"])) for _ in range(rng.randint(3, 12))]
        a = " ".join(WORDS[src][i] for i in idx)
        b = " ".join(WORDS[tgt][i] for i in idx)
        out.append((a[0].upper() + a[1:] + ".", b[0].upper() + b[1:] + "."))
    return out


def text(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def sgml(kind: str, lang: str, segments: list[str], setid: str = "newstest", docs: int = 3) -> bytes:
    """``segments`` wrapped as a WMT ``srcset``/``refset`` SGML file, cut into ``docs`` documents."""
    per = -(-len(segments) // docs)
    head = f'<{kind} setid="{setid}" srclang="any"' + (f' trglang="{lang}">' if kind == "refset" else ">")
    out = [head]
    for d in range(0, len(segments), per):
        out.append(f'<doc sysid="ref" docid="doc{d // per}" genre="news" origlang="en">')
        out += [f'<seg id="{i + 1}">{s}</seg>' for i, s in enumerate(segments[d:d + per])]
        out.append("</doc>")
    out.append(f"</{kind}>")
    return text(out)


def write_gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text(lines), mtime=0))
    return path


def write(path: Path, data: bytes | list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text(data) if isinstance(data, list) else data)
    return path


def tar_bytes(entries: dict[str, bytes], gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def en_de_archives(train_pairs: int = 400, eval_pairs: int = 60) -> dict[str, bytes]:
    """The published WMT'14 En-De archives' names and member names (the registry's),
    holding synthetic text: what a mirror of the real downloads looks like."""
    def side(lang: str, items: list[tuple[str, str]]) -> bytes:
        return text([e if lang == "en" else d for e, d in items])

    ep, cc, nc = (pairs(train_pairs, "en", "de", seed) for seed in (1, 2, 3))
    dev12, dev13, test14 = (pairs(eval_pairs, "en", "de", seed) for seed in (12, 13, 14))

    def both(kind_lang: str, items: list[tuple[str, str]]) -> list[str]:
        return [e if kind_lang == "en" else d for e, d in items]

    dev = {}
    for year, items in (("2012", dev12), ("2013", dev13)):
        for lang in ("en", "de"):  # dev.tgz has every language as source and as reference
            dev[f"dev/newstest{year}-src.{lang}.sgm"] = sgml("srcset", lang, both(lang, items), f"newstest{year}")
            dev[f"dev/newstest{year}-ref.{lang}.sgm"] = sgml("refset", lang, both(lang, items), f"newstest{year}")
    test = {}
    for lang in ("en", "de"):
        test[f"test-full/newstest2014-deen-src.{lang}.sgm"] = sgml("srcset", lang, both(lang, test14), "newstest2014")
        test[f"test-full/newstest2014-deen-ref.{lang}.sgm"] = sgml("refset", lang, both(lang, test14), "newstest2014")
    return {
        "training-parallel-europarl-v7.tgz": tar_bytes({
            "training/europarl-v7.fr-en.fr": b"pas voulu\n",  # the real archive holds the other pairs too
            **{f"training/europarl-v7.de-en.{lang}": side(lang, ep) for lang in ("en", "de")}}),
        "training-parallel-commoncrawl.tgz": tar_bytes({f"commoncrawl.de-en.{lang}": side(lang, cc) for lang in ("en", "de")}),
        "training-parallel-nc-v9.tgz": tar_bytes(
            {f"training/news-commentary-v9.de-en.{lang}": side(lang, nc) for lang in ("en", "de")}),
        "dev.tgz": tar_bytes(dev),
        "test-full.tgz": tar_bytes(test),
    }
