"""Import official statute text exported from the law.go.kr Open API into the KB format.

Input is the body of a 법령 본문 조회 response, saved to a file:
`https://www.law.go.kr/DRF/lawService.do?OC=<id>&target=law&MST=<n>&type=XML` (or `type=JSON`).
Both carry the same Korean keys::

    법령
      기본정보 / 법령명_한글            law name, e.g. "민법"
      조문 / 조문단위 (repeated)
        조문번호, 조문가지번호          3 and 2 for 제3조의2; 가지번호 absent (or "0") otherwise
        조문여부                        "조문" for an article, "전문" for a 편·장·절 heading
        조문제목                        absent for deleted articles
        조문내용                        "제3조의2(보증금의 회수)", plus the body when there is no 항
        항 (repeated): 항번호 "①", 항내용 "① ..." (already numbered), 호 (repeated):
          호번호 "1.", 호내용 "1. ...", 목 (repeated): 목번호 "가.", 목내용 "가. ..."

In JSON any repeated element holding a single child is an object rather than a list, and a
text field may be a list of strings. Output records match `kotune.statutes.load_kb`:
`{"law", "article" ("3의2"), "title", "paragraphs" (one string per 항, its 호·목 appended), "keywords"}`.
Editorial notes such as `<개정 2020. 6. 9.>` and `[본조신설 1984. 4. 10.]` are dropped: they
date amendments and are not part of the rule. Write into a folder of its own or one without
another file for the same law, since `load_kb` rejects duplicate articles.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .statutes import format_cite, load_kb

_HEADER = re.compile(r"^제\s*\d+\s*조(?:\s*의\s*\d+)?\s*")
_NOTES = re.compile(r"<[^<>]*(?:개정|신설)[^<>]*>|<[\d.,\s]+>|\[[^\[\]]*(?:신설|개정|이동|시행일)[^\[\]]*\]")
_DELETED = re.compile(r"삭제\s*(?:<[^<>]*>)?")
_NUMBERED = re.compile(r"[\u2460-\u2473\u3251-\u325f\u32b1-\u32bf]|\d+\.?\s")  # ①..㊿, "1."


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _text(value: Any) -> str:
    """Flattened, whitespace-normalised text; the API pads 호·목 with tabs and double spaces."""
    if isinstance(value, list):
        return " ".join(t for t in map(_text, value) if t)
    if isinstance(value, dict):
        return ""
    return " ".join(str(value).split()) if value is not None else ""


def _clean(text: str) -> str:
    return " ".join(_NOTES.sub(" ", text).split())


def _xml_to_dict(el: ET.Element) -> Any:
    # Turning XML into the JSON shape lets one parser serve both exports.
    children = list(el)
    if not children:
        return "".join(el.itertext())
    out: dict[str, Any] = {}
    for child in children:
        value = _xml_to_dict(child)
        if child.tag in out:
            out[child.tag] = _as_list(out[child.tag]) + [value]
        else:
            out[child.tag] = value
    return out


def _load(path: Path) -> dict[str, Any]:
    fix = "save the response of lawService.do?target=law&type=XML (or type=JSON) unchanged, as UTF-8"
    try:
        raw = path.read_bytes().decode("utf-8-sig").lstrip()
        if raw.startswith("<") or (not raw.startswith("{") and path.suffix.lower() == ".xml"):
            root = ET.fromstring(raw.encode("utf-8"))
            return {root.tag: _xml_to_dict(root)}
        if raw.startswith("{") or path.suffix.lower() == ".json":
            data = json.loads(raw)
            if isinstance(data, dict):
                return data
    except (UnicodeDecodeError, ET.ParseError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name}: not a readable law.go.kr export ({type(e).__name__}: {e}); {fix}") from None
    raise ValueError(f"{path.name}: not a law.go.kr export (expected XML or a JSON object); {fix}")


def _paragraph(hang: Any) -> tuple[str, list[str]]:
    """A 항's own text (numbered) and the texts of its 호 and their 목, in order."""
    if not isinstance(hang, dict):
        return _text(hang), []
    number, body = _text(hang.get("항번호")), _text(hang.get("항내용"))
    if body and number and not _NUMBERED.match(body):
        body = f"{number} {body}"
    items: list[str] = []
    for ho in _as_list(hang.get("호")):
        if not isinstance(ho, dict):
            items.append(_text(ho))
            continue
        items.append(_text(ho.get("호내용")))
        items += [_text(m.get("목내용") if isinstance(m, dict) else m) for m in _as_list(ho.get("목"))]
    return body, [i for i in items if i]


def _article(unit: dict[str, Any]) -> tuple[str, str, str, str]:
    """(article id, title, content with the 제N조(제목) header removed, raw 조문내용)."""
    num = _text(unit.get("조문번호"))
    branch = _text(unit.get("조문가지번호"))
    num = str(int(num)) if num.isdigit() else num
    article = f"{num}의{int(branch)}" if branch.isdigit() and int(branch) else num
    title = _text(unit.get("조문제목"))
    content = _text(unit.get("조문내용"))
    lead = _HEADER.sub("", content, count=1)
    if title and lead.startswith(f"({title})"):
        lead = lead[len(title) + 2 :]
    elif lead.startswith("("):
        lead = re.sub(r"^\([^)]*\)", "", lead, count=1)
    return article, title, lead.strip(), content


def parse_law_export(path: str | Path) -> tuple[list[dict], list[str]]:
    """Records in KB format plus a line for each unit skipped (headings, deleted, duplicates)."""
    path = Path(path)
    data = _load(path)
    law_root = data.get("법령")
    if not isinstance(law_root, dict):  # target=eflaw and friends wrap the same body differently
        law_root = next((v for v in data.values() if isinstance(v, dict) and "조문" in v), {})
    info = law_root.get("기본정보") if isinstance(law_root.get("기본정보"), dict) else {}
    law = _text(info.get("법령명_한글") or info.get("법령명한글"))
    jo = law_root.get("조문")
    units = [u for j in _as_list(jo) if isinstance(j, dict) for u in _as_list(j.get("조문단위"))]
    if not units:
        raise ValueError(
            f"{path.name}: no 조문 found; export the full text with lawService.do?target=law, not lawSearch.do"
        )
    if not law:
        raise ValueError(
            f"{path.name}: 기본정보/법령명_한글 (law name) is missing; re-export the file from lawService.do"
        )
    records: list[dict] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for unit in (u for u in units if isinstance(u, dict)):
        article, title, lead, content = _article(unit)
        where = format_cite(law, article)
        if _text(unit.get("조문여부")) == "전문":
            # A heading carries the number of the article after it, so keeping it would duplicate that article.
            skipped.append(f"{law} {content}: heading (조문여부 전문)")
            continue
        hangs = _as_list(unit.get("항"))
        # Judge deletion on the text without its notes too: "삭제 <2020. 6. 9.> [종전 제5조는 제6조로 이동 …]"
        # with a 조문제목 (some exports title a deleted article "삭제") was imported as an article reading "삭제".
        deleted = _DELETED.fullmatch(lead) or _DELETED.fullmatch(_clean(lead))
        if deleted or (not title and not hangs and lead.startswith("삭제")):
            skipped.append(f"{where}: deleted ({content})")
            continue
        if not article or article in seen:
            skipped.append(f"{where}: {'duplicate' if article else 'no 조문번호'}")
            continue
        seen.add(article)
        paragraphs: list[str] = [_clean(lead)] if _clean(lead) else []
        # 호 hanging straight off the article ("다음 각 호와 같다") belong to the lead sentence.
        for body, items in [("", _paragraph({"호": unit.get("호")})[1])] + [_paragraph(h) for h in hangs]:
            body = _clean(body)
            if body and not (paragraphs and paragraphs[-1] == body):
                paragraphs.append(body)
            if items:
                if not paragraphs:
                    paragraphs.append("")
                paragraphs[-1] = " ".join(p for p in [paragraphs[-1], *map(_clean, items)] if p)
        if not paragraphs:
            skipped.append(f"{where}: no text")
            continue
        records.append({"law": law, "article": article, "title": title, "paragraphs": paragraphs, "keywords": []})
    return records, skipped


def parse_law_file(path: str | Path) -> list[dict]:
    """KB records for every article in a law.go.kr lawService export (XML or JSON)."""
    return parse_law_export(path)[0]


def law_filename(law: str) -> str:
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", law).strip(" ._")
    return re.sub(r"\s+", "_", name) or "law"


def import_law_file(
    path: str | Path, out_dir: str | Path, keep_keywords_from: str | Path | None = None
) -> tuple[int, list[str]]:
    """Write `<out_dir>/<law>.jsonl` from an export; returns (articles written, skipped units).

    Keywords are empty unless `keep_keywords_from` (a KB folder) has the same (law, article):
    kotune's hand-written search words stay useful when only the text is swapped.
    """
    records, skipped = parse_law_export(path)
    if not records:
        raise ValueError(
            f"{Path(path).name}: every 조문 was skipped ({len(skipped)}); check that it is a law body export"
        )
    if keep_keywords_from is not None:
        old = load_kb(keep_keywords_from)
        for r in records:
            if (art := old.get((r["law"], r["article"]))) is not None:
                r["keywords"] = list(art.keywords)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{law_filename(records[0]['law'])}.jsonl"
    target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return len(records), skipped
