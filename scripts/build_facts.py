#!/usr/bin/env python
"""Build the world-facts triples table the embedded default model is trained on.

Source: the ``countryinfo`` package (offline JSON country data), with ISO 639 language codes and
ISO 4217 currency codes turned into English names by ``pycountry``.  Both are in the ``data`` extra
(``pip install -e '.[data]'``); the runtime never needs them: it reads the committed
``src/modelql/data/facts.tsv``.

Writes ``facts.tsv`` (header ``entity<TAB>relation<TAB>target``, one triple per line, sorted) and
``facts.README.md`` (provenance: package versions, date, counts, every cleaning rule and what it
dropped).

    python scripts/build_facts.py [--out-dir src/modelql/data] [--date YYYY-MM-DD]
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import importlib.metadata
import re
import sys
from pathlib import Path

RELATIONS = ("capital", "continent", "subregion", "language", "currency", "demonym", "borders")

# Renamed countries (countryinfo's data predates the rename) and names whose countryinfo form is an
# ISO "inverted" or parenthesised form that reads badly in a sentence.
NAME_OVERRIDES = {
    "Republic of Macedonia": "North Macedonia",
    "Swaziland": "Eswatini",
    "Vatican City State": "Vatican City",
    "Cocos (Keeling) Islands": "Cocos Islands",
    "Saint Martin (French part)": "Saint Martin",
    "Sint Maarten (Dutch part)": "Sint Maarten",
    "Virgin Islands, British": "British Virgin Islands",
    "Virgin Islands, U.S.": "United States Virgin Islands",
    "Bonaire, Sint Eustatius and Saba": "Caribbean Netherlands",
}

# ISO 639 names that are not the everyday English name of the language.
LANGUAGE_OVERRIDES = {
    "el": "Greek",
    "ps": "Pashto",
    "ny": "Chichewa",
    "ht": "Haitian Creole",
    "to": "Tongan",
    "km": "Khmer",
    "ky": "Kyrgyz",
    "pa": "Punjabi",
    "rn": "Kirundi",
    "kl": "Greenlandic",
    "na": "Nauruan",
    "dv": "Dhivehi",
    "ms": "Malay",
    "sw": "Swahili",
    "nb": "Norwegian Bokmål",
    "nn": "Norwegian Nynorsk",
}

# ISO 4217 fund codes / non-circulating units listed next to the real currency.
CURRENCY_FUND_CODES = {"BOV", "CLF", "CHE", "CHW", "USN", "USS", "UYI", "XDR", "XSU", "XUA", "COU", "MXV"}

# Withdrawn ISO 4217 codes in countryinfo's (older) data, replaced by their successor currency
# (redenominations and euro adoptions). CUC (abolished, no successor) is dropped.
CURRENCY_SUCCESSORS = {"HRK": "EUR", "BGN": "EUR", "BYR": "BYN", "MRO": "MRU", "SLL": "SLE", "STD": "STN",
                       "VEF": "VES", "ZMK": "ZMW"}

# countryinfo "demonyms" that are place names, not demonyms.
DEMONYM_OVERRIDES = {"Djibouti": "Djiboutian", "Gibraltar": "Gibraltarian", "Christmas Island": "Christmas Islander"}

# Capital strings shared by several kept countries: the fact is kept for the most populous one only
# when it is at least this many times more populous than the next (Kingston: Jamaica vs Norfolk
# Island); otherwise (Jerusalem: Israel vs Palestine) the capital fact is dropped for all of them.
CAPITAL_DOMINANCE = 10


def _clean(s: object) -> str:
    if not isinstance(s, str):
        return ""
    return re.sub(r"\s+", " ", s).strip()


def _strip_paren(s: str) -> str:
    return re.sub(r"\s*\([^)]*\)", "", s).strip()


def build(log: list[str]) -> tuple[list[tuple[str, str, str]], dict]:
    import pycountry
    from countryinfo._cache import load_countries

    raw = load_countries()["countries"]
    log.append(f"countryinfo entries: {len(raw)}")

    # 1. entities: current ISO 3166-1 countries/territories with a capital and a region.
    by_a3: dict[str, list[dict]] = collections.defaultdict(list)
    for key in sorted(raw):
        d = raw[key]
        a3 = ((d.get("ISO") or {}).get("alpha3") or "").upper()
        if not a3 or pycountry.countries.get(alpha_3=a3) is None:
            log.append(f"dropped entity {d.get('name')!r}: no current ISO 3166-1 alpha-3 code ({a3 or 'none'})")
            continue
        by_a3[a3].append(d)

    def completeness(d: dict) -> int:
        return sum(bool(d.get(f)) for f in ("capital", "region", "subregion", "languages", "currencies", "demonym", "borders"))

    entities: dict[str, dict] = {}  # alpha3 -> record
    for a3, recs in sorted(by_a3.items()):
        iso = pycountry.countries.get(alpha_3=a3)
        iso_names = {iso.name, getattr(iso, "common_name", iso.name)}
        recs.sort(key=lambda d: (-completeness(d), d["name"] not in iso_names, d["name"]))
        for other in recs[1:]:
            log.append(f"dropped entity {other['name']!r}: duplicate of {recs[0]['name']!r} (ISO {a3})")
        d = recs[0]
        cap = d.get("capital")
        if isinstance(cap, list):
            cap = cap[0] if cap else ""
        cap = _clean(cap)
        if not cap or cap == "None" or not _clean(d.get("region")):
            log.append(f"dropped entity {d['name']!r}: no capital or no region (uninhabited territory)")
            continue
        name = NAME_OVERRIDES.get(d["name"], _clean(d["name"]))
        if name != d["name"]:
            log.append(f"renamed {d['name']!r} -> {name!r}")
        entities[a3] = {"raw": d, "name": name, "capital": cap, "alpha2": (d["ISO"].get("alpha2") or "").upper()}

    code_to_name = {}
    for a3, e in entities.items():
        code_to_name[a3] = e["name"]
        if e["alpha2"]:
            code_to_name[e["alpha2"]] = e["name"]

    triples: set[tuple[str, str, str]] = set()

    # capital, with the shared-capital rule
    by_cap: dict[str, list[str]] = collections.defaultdict(list)
    for a3, e in entities.items():
        by_cap[e["capital"]].append(a3)
    for cap, a3s in sorted(by_cap.items()):
        if len(a3s) > 1:
            ranked = sorted(a3s, key=lambda a: -(entities[a]["raw"].get("population") or 0))
            pops = [entities[a]["raw"].get("population") or 0 for a in ranked]
            if pops[0] >= CAPITAL_DOMINANCE * max(pops[1], 1):
                keep = [ranked[0]]
                log.append(f"shared capital {cap!r}: kept for {entities[ranked[0]]['name']!r}, dropped for "
                           + ", ".join(repr(entities[a]["name"]) for a in ranked[1:]))
            else:
                keep = []
                log.append(f"shared capital {cap!r}: ambiguous between "
                           + ", ".join(repr(entities[a]["name"]) for a in ranked) + "; dropped for all")
        else:
            keep = a3s
        for a3 in keep:
            triples.add((entities[a3]["name"], "capital", cap))

    for a3, e in entities.items():
        d, name = e["raw"], e["name"]
        # continent: countryinfo's UN region, with the Americas split into North/South America
        region = _clean(d.get("region"))
        if region == "Americas":
            region = "South America" if d.get("intermediateregion") == "South America" else "North America"
        triples.add((name, "continent", region))
        sub = _clean(d.get("subregion"))
        if sub == "South-Eastern Asia":
            sub = "South-eastern Asia"
        if sub:
            triples.add((name, "subregion", sub))
        else:
            log.append(f"{name!r}: no subregion")
        for code in d.get("languages") or []:
            code = _clean(code)
            lang = None
            if code in LANGUAGE_OVERRIDES:
                lang = LANGUAGE_OVERRIDES[code]
            elif len(code) == 2:
                rec = pycountry.languages.get(alpha_2=code)
                lang = _strip_paren(rec.name) if rec else None
            elif len(code) == 3:
                rec = pycountry.languages.get(alpha_3=code)
                lang = _strip_paren(rec.name) if rec else None
            if lang:
                triples.add((name, "language", lang))
            else:
                log.append(f"{name!r}: unknown language code {code!r} dropped")
        for code in d.get("currencies") or []:
            code = _clean(code).upper()
            if code in CURRENCY_FUND_CODES:
                log.append(f"{name!r}: currency fund code {code} dropped")
                continue
            if code in CURRENCY_SUCCESSORS:
                log.append(f"{name!r}: withdrawn currency code {code} replaced by {CURRENCY_SUCCESSORS[code]}")
                code = CURRENCY_SUCCESSORS[code]
            rec = pycountry.currencies.get(alpha_3=code)
            if rec is None:
                log.append(f"{name!r}: currency code {code} not in ISO 4217 (withdrawn) dropped")
                continue
            triples.add((name, "currency", rec.name))
        dem = _clean(d.get("demonym"))
        dem = DEMONYM_OVERRIDES.get(dem, dem)
        if dem and dem != "None":
            triples.add((name, "demonym", " and ".join(p.strip() for p in dem.split(","))))
        else:
            log.append(f"{name!r}: no demonym")
        for code in d.get("borders") or []:
            other = code_to_name.get(_clean(code).upper())
            if other and other != name:
                triples.add((name, "borders", other))
                triples.add((other, "borders", name))  # borders are symmetric
            elif not other:
                log.append(f"{name!r}: border code {code!r} is not a kept entity, dropped")

    # no tabs/newlines, no empty fields
    for t in triples:
        assert all(x and "\t" not in x and "\n" not in x for x in t), t
    stats = {"entities": len(entities), "triples": len(triples),
             "per_relation": dict(collections.Counter(r for _, r, _ in triples))}
    return sorted(triples, key=lambda t: (t[0], RELATIONS.index(t[1]), t[2])), stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "src/modelql/data")
    ap.add_argument("--date", default=_dt.date.today().isoformat(), help="date recorded in the provenance")
    args = ap.parse_args(argv)
    log: list[str] = []
    triples, stats = build(log)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "facts.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("entity\trelation\ttarget\n")
        for t in triples:
            f.write("\t".join(t) + "\n")
    versions = {p: importlib.metadata.version(p) for p in ("countryinfo", "pycountry")}
    per_rel = "\n".join(f"| {r} | {stats['per_relation'].get(r, 0)} |" for r in RELATIONS)
    readme = f"""# facts.tsv — provenance

World-facts triples `(entity, relation, target)` the embedded default model
(`default-model/`) is trained on and measured against. Generated by `scripts/build_facts.py`;
do not edit by hand.

- Source: `countryinfo` {versions['countryinfo']} (country JSON data shipped in the package),
  language names from ISO 639 and currency names from ISO 4217 via `pycountry` {versions['pycountry']}.
- Built: {args.date}
- Entities: {stats['entities']} countries and territories; triples: {stats['triples']}.

| relation | triples |
|---|---|
{per_rel}

## Relations

- `capital`: countryinfo's capital (the first one when it lists several).
- `continent`: countryinfo's UN region (Africa, Asia, Europe, Oceania), with "Americas" split into
  North America / South America by the UN intermediate region (Central America and the Caribbean
  are North America).
- `subregion`: the UN subregion.
- `language`: one triple per listed language (multi-valued), ISO 639 code → English name
  (pycountry, parentheses removed; a few ISO names replaced by their everyday English name, see
  `LANGUAGE_OVERRIDES` in the script).
- `currency`: one triple per listed currency, ISO 4217 code → ISO name; fund codes and withdrawn
  withdrawn codes replaced by their successor (`CURRENCY_SUCCESSORS`: HRK, BGN → Euro, BYR → BYN, ...),
  CUC (abolished) dropped.
- `demonym`: countryinfo's demonym ("A,B" → "A and B"; three place names fixed).
- `borders`: one triple per neighbour (multi-valued), both directions, only between kept entities.

## Cleaning rules

- Entities need a current ISO 3166-1 alpha-3 code, a capital and a region; duplicates of one code
  (e.g. Burma/Myanmar) keep the most complete entry.
- A few renamed or inverted names replaced (`NAME_OVERRIDES`).
- Capital strings shared by two kept entities: kept only for the most populous one when it is at
  least {CAPITAL_DOMINANCE}x more populous than the next, otherwise dropped for all (ambiguous).
- Missing values produce no triple.

## Build log

""" + "\n".join(f"- {line}" for line in log) + "\n"
    (args.out_dir / "facts.README.md").write_text(readme, encoding="utf-8")
    print(f"wrote {len(triples)} triples for {stats['entities']} entities to {args.out_dir / 'facts.tsv'}")
    for r in RELATIONS:
        print(f"  {r:10s} {stats['per_relation'].get(r, 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
