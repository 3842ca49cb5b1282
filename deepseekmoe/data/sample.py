"""The public-domain sample shipped in the package, and `default_dataset()` built from it.

deepseekmoe/assets/sample/{train,val}.jsonl.xz hold whole books from the team's Project Gutenberg
corpus (source: github.com/rcdm-uga/Gutenberg_Text), one book per line with its title and author;
deepseekmoe/assets/PROVENANCE.md lists them. `BOOKS` below is the exact selection and
`build_sample()` the exact cut (rerun: `python -c "from deepseekmoe.data.sample import build_sample;
build_sample('../shared/data/pretrain/gutenberg')"`).

`default_dataset()` trains a 4096-entry byte-level BPE (the `tiny` preset's vocab_size, bos = 0,
eos = 1) on the training books and prepares the token dataset once, in a cache directory keyed by
the sample's hash, the vocab size and the dataset format version; the temporaries a killed build
left there are deleted at the next build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import re
import warnings
from importlib import resources
from pathlib import Path

from deepseekmoe.errors import DataError

SAMPLE_VOCAB = 4096
SOURCE_REPO = "rcdm-uga/Gutenberg_Text"

# (file name prefix in the source corpus, title, author (life), first published, split)
BOOKS = [
    ("Austen_Jane/Emma_txt", "Emma", "Jane Austen (1775-1817)", 1815, "train"),
    ("Austen_Jane/Northanger_Abbey", "Northanger Abbey", "Jane Austen (1775-1817)", 1817, "train"),
    ("Austen_Jane/Mansfield_Park", "Mansfield Park", "Jane Austen (1775-1817)", 1814, "train"),
    ("Bronte_Charlotte/Jane_Eyre", "Jane Eyre", "Charlotte Brontë (1816-1855)", 1847, "train"),
    ("Shelley_Mary_Wollstonecraft/Frankenstein", "Frankenstein; or, The Modern Prometheus (1818 text)",
     "Mary Shelley (1797-1851)", 1818, "train"),
    ("Stoker_Bram/Dracula_txt", "Dracula", "Bram Stoker (1847-1912)", 1897, "train"),
    ("Swift_Jonathan/Gulliver", "Gulliver's Travels", "Jonathan Swift (1667-1745)", 1726, "train"),
    ("Doyle_Arthur_Conan/Adventures_of_Sherlock", "The Adventures of Sherlock Holmes",
     "Arthur Conan Doyle (1859-1930)", 1892, "train"),
    ("Montgomery_L_M_Lucy_Maud/Anne_of_Green_Gables", "Anne of Green Gables",
     "L. M. Montgomery (1874-1942)", 1908, "train"),
    ("Burnett_Frances_Hodgson/A_Little_Princess", "A Little Princess", "Frances Hodgson Burnett (1849-1924)",
     1905, "train"),
    ("Kipling_Rudyard/Captains_Courageous", "Captains Courageous", "Rudyard Kipling (1865-1936)", 1897, "train"),
    ("Conrad_Joseph/Almayer", "Almayer's Folly", "Joseph Conrad (1857-1924)", 1895, "train"),
    ("Joyce_James/Dubliners", "Dubliners", "James Joyce (1882-1941)", 1914, "train"),
    ("Joyce_James/A_Portrait", "A Portrait of the Artist as a Young Man", "James Joyce (1882-1941)", 1916,
     "train"),
    ("Wells_H_G_Herbert_George/Ann_Veronica", "Ann Veronica", "H. G. Wells (1866-1946)", 1909, "train"),
    ("Franklin_Benjamin/Autobiography_of", "Autobiography of Benjamin Franklin", "Benjamin Franklin (1706-1790)",
     1791, "train"),
    ("Thoreau_Henry_David/Cape_Cod", "Cape Cod", "Henry David Thoreau (1817-1862)", 1865, "train"),
    ("Burroughs_Edgar_Rice/A_Princess_of_Mars", "A Princess of Mars", "Edgar Rice Burroughs (1875-1950)", 1917,
     "train"),
    ("Alcott_Louisa_May/An_Old_Fashioned", "An Old-Fashioned Girl", "Louisa May Alcott (1832-1888)", 1870,
     "train"),
    ("Melville_Herman/Israel_Potter", "Israel Potter: His Fifty Years of Exile", "Herman Melville (1819-1891)",
     1855, "train"),
    ("Baum_L_Frank_Lyman_Frank/American_Fairy", "American Fairy Tales", "L. Frank Baum (1856-1919)", 1901,
     "train"),
    ("Dickens_Charles/A_Child_s_History", "A Child's History of England", "Charles Dickens (1812-1870)", 1853,
     "train"),
    ("London_Jack/Before_Adam", "Before Adam", "Jack London (1876-1916)", 1907, "train"),
    ("Kemble_E_W_Edward_Windsor/Adventures_of_Huckleberry", "Adventures of Huckleberry Finn",
     "Mark Twain (1835-1910)", 1884, "train"),
    ("Carroll_Lewis/Alice_s_Adventures_in_Wonderland_txt", "Alice's Adventures in Wonderland",
     "Lewis Carroll (1832-1898)", 1865, "val"),
    ("Dickens_Charles/A_Christmas_Carol_txt", "A Christmas Carol", "Charles Dickens (1812-1870)", 1843, "val"),
]

# The only Project Gutenberg text left in these books after the corpus's header/footer removal:
# a closing "End of (the) Project Gutenberg('s) EBook of ..." line, cut here.
_PG_FOOTER = re.compile(r"\n[ \t]*\**[ \t]*End of (the )?Project Gutenberg.*\Z", re.S | re.I)


def asset_dir() -> Path:
    return Path(str(resources.files("deepseekmoe") / "assets" / "sample"))


def sample_files() -> tuple[Path, Path]:
    d = asset_dir()
    train, val = d / "train.jsonl.xz", d / "val.jsonl.xz"
    if not train.is_file() or not val.is_file():
        raise DataError(f"the shipped sample is missing from {d} (a broken install?); reinstall deepseekmoe")
    return train, val


def clean(text: str) -> str:
    return _PG_FOOTER.sub("", text).rstrip() + "\n"


def build_sample(src_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Cut the sample from the corpus in `src_dir` (jsonl.xz, fields text/source/file)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir) if out_dir else asset_dir()
    found: dict[str, dict] = {}
    for path in sorted(src_dir.glob("*.jsonl.xz")):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for prefix, title, author, year, split in BOOKS:
                    if row["file"].startswith(prefix):
                        if prefix in found:
                            raise DataError(f"{prefix!r} matches two books in {src_dir}")
                        found[prefix] = {"text": clean(row["text"]), "title": title, "author": author,
                                         "published": year, "source": row.get("source", SOURCE_REPO),
                                         "file": row["file"], "split": split}
    missing = [b[0] for b in BOOKS if b[0] not in found]
    if missing:
        raise DataError(f"{src_dir}: books not found: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in ("train", "val"):
        rows = [found[b[0]] for b in BOOKS if b[4] == split]
        payload = "".join(json.dumps({k: v for k, v in r.items() if k != "split"}, ensure_ascii=False) + "\n"
                          for r in rows).encode("utf-8")
        blob = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
        (out_dir / f"{split}.jsonl.xz").write_bytes(blob)
        stats[split] = {"books": len(rows), "text_bytes": sum(len(r["text"].encode()) for r in rows),
                        "xz_bytes": len(blob)}
    return stats


# ------------------------------------------------------------------------------------ default dataset
def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DEEPSEEKMOE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepseekmoe"


def sample_key(vocab_size: int = SAMPLE_VOCAB) -> str:
    from deepseekmoe.data.dataset import VERSION
    from deepseekmoe.data.prepare import PREPARE_VERSION

    h = hashlib.sha256()
    for p in sample_files():
        h.update(p.read_bytes())
    return f"{h.hexdigest()[:16]}-v{vocab_size}-f{VERSION}.{PREPARE_VERSION}"


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock, so concurrent first calls build the dataset once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the result whole
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_dataset(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The shipped sample as a prepared dataset (4096-entry BPE); built on first use, then cached.

    Cache: `cache_dir`, else $DEEPSEEKMOE_CACHE, else $XDG_CACHE_HOME/deepseekmoe (~/.cache/...).
    """
    from deepseekmoe.checkpoint.files import remove_temporaries
    from deepseekmoe.data.dataset import load_meta
    from deepseekmoe.data.prepare import prepare

    root = cache_root(cache_dir) / "data"
    out = root / f"gutenberg-sample-{sample_key()}"
    with _lock(root / ".lock"):
        # Under the lock no other process writes here, so what a killed build left is stale.
        remove_temporaries(root, "gutenberg-sample-")
        try:
            load_meta(out)
            return out
        except DataError as e:  # not built yet, or damaged: (re)build it, saying so when damaged
            if out.exists():
                warnings.warn(f"rebuilding the default dataset: {e}", RuntimeWarning, stacklevel=2)
        train, val = sample_files()
        try:
            prepare([train], out, vocab_size=SAMPLE_VOCAB, val_inputs=[val], seed=0, progress=progress)
        except DataError as e:
            raise DataError(f"building the default dataset in {out} failed: {e}") from e
    return out

