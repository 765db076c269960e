"""Exact, fast tokenisation for byte-level BPE tokenizers (GPT-2 / SmolLM2 family), built on tiktoken.

`FastBPE.encode_batch(texts)` returns the very ids and character offsets that the tokenizer's own Rust backend
(`backend_tokenizer.encode_batch`) would return, several times faster, as flat numpy arrays. It is only used where it
can be shown to be identical; `fast_encoder(tokenizer)` returns None (the caller then uses the HF backend) otherwise.

Why the result is identical to HF:

* Supported configurations only: model BPE (no dropout, no subword prefix/suffix, no byte fallback, ignore_merges
  off), no normalizer, pre-tokenizer ByteLevel(add_prefix_space=False, use_regex=True) -- the GPT-2 regex --,
  post-processor None / TemplateProcessing / ByteLevel(trim_offsets=False) (or a Sequence of those), no truncation or
  padding on the backend, added tokens with no lstrip/rstrip/single_word, one `normalized` flag for all, none a
  prefix of another and none containing whitespace. Anything else: `Unsupported`, and the caller uses HF.
* BPE. HF merges the adjacent pair with the lowest merge index; tiktoken merges the adjacent pair whose
  concatenation has the lowest rank. With rank(token) = index of the merge that creates it, the two agree at every
  step provided (K1) no token is created by two merges and (K3) every merged token is its own HF encoding,
  HF-BPE(bytes(t)) == [t]. Proof: HF's candidate pairs are always a subset of tiktoken's, with equal priorities
  (K1). At a first divergence tiktoken would merge a "phantom" pair (u, v), uv = t in the vocab but (u, v) not a
  merge. The bytes of t are then tiled exactly by u and v, and since merges only ever look at adjacent symbols, the
  symbols inside that range evolved exactly as HF-BPE run on bytes(t) alone would, so [u, v] is a state of HF-BPE on
  bytes(t); from there HF has no merge, so HF-BPE(bytes(t)) = [u, v] != [t], contradicting K3. (K3 also makes
  tiktoken's shortcut "a piece that is a whole token encodes to that token" agree with HF.) Both conditions are
  checked when the encoder is built (K3 by running HF's own model on every merged token; the compiled model and its
  verdict are cached on disk keyed by the sha256 of the model's JSON, see `FastBPE`), else `Unsupported`.
* Pre-tokenisation. HF's GPT-2 regex is `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`
  run by Oniguruma with its own Unicode tables. tiktoken runs the same pattern with explicit character classes
  (`_L_RANGES`, `_N_RANGES`: letters and numbers exactly as HF's Oniguruma classes them -- Unicode 16 in tokenizers
  0.23 --, read off by probing every code point with `hf_char_classes`; `_WS_RANGES`: White_Space), and without the
  look-ahead, which is emulated by inserting an unmatched sentinel (U+001E) before the last character of every
  whitespace run of length >= 2 that is followed by a non-space character (exactly where `\\s+(?!\\S)` stops), so the
  plain (fast, DFA) regex engine can be used. Texts are joined with the same sentinel and encoded in one call per
  thread. Every character class is checked against HF's own pre-tokenizer, once per distinct character (all of
  ASCII at build time; each new non-ASCII character lazily, by probing `pre_tokenizer.pre_tokenize_str`); a text
  containing a character whose class differs, the sentinel itself, or a lone surrogate is encoded by HF instead.
* Added tokens are split out first, as HF does (tiktoken's special-token pass; matches are unique because no added
  token is a prefix of another). Post-processor tokens get offsets (0, 0), as in HF.
* Offsets. Byte-level BPE tokens tile the UTF-8 bytes of the text, so token byte offsets are the cumulative sum of
  token byte lengths (a lookup table); a token's character offsets are (char of its first byte, char of its last
  byte + 1), HF's convention, including tokens that hold part of a multi-byte character.

The tests (tests/test_fast_tokenize.py) compare ids and offsets with HF on the bundled data sets and on
hypothesis-generated unicode text.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imtune.masking.threads import ForkSafePool

ALGO_VERSION = "1"
SENTINEL = "\x1e"
_SENT_B = 0x1E

# Code points that HF's GPT-2 pre-tokenizer counts as letters (\p{L}) and numbers (\p{N}) -- Oniguruma's Unicode 16
# tables in tokenizers 0.23 --, as hex ranges; generated with `derive_class_tables`. They only decide speed: every
# character is checked against the live HF pre-tokenizer before the fast path relies on it.
_L_RANGES = (
    "41-5A 61-7A AA B5 BA C0-D6 D8-F6 F8-2C1 2C6-2D1 2E0-2E4 2EC 2EE 370-374 376-377 37A-37D 37F 386 388-38A 38C "
    "38E-3A1 3A3-3F5 3F7-481 48A-52F 531-556 559 560-588 5D0-5EA 5EF-5F2 620-64A 66E-66F 671-6D3 6D5 6E5-6E6 "
    "6EE-6EF 6FA-6FC 6FF 710 712-72F 74D-7A5 7B1 7CA-7EA 7F4-7F5 7FA 800-815 81A 824 828 840-858 860-86A 870-887 "
    "889-88E 8A0-8C9 904-939 93D 950 958-961 971-980 985-98C 98F-990 993-9A8 9AA-9B0 9B2 9B6-9B9 9BD 9CE 9DC-9DD "
    "9DF-9E1 9F0-9F1 9FC A05-A0A A0F-A10 A13-A28 A2A-A30 A32-A33 A35-A36 A38-A39 A59-A5C A5E A72-A74 A85-A8D "
    "A8F-A91 A93-AA8 AAA-AB0 AB2-AB3 AB5-AB9 ABD AD0 AE0-AE1 AF9 B05-B0C B0F-B10 B13-B28 B2A-B30 B32-B33 B35-B39 "
    "B3D B5C-B5D B5F-B61 B71 B83 B85-B8A B8E-B90 B92-B95 B99-B9A B9C B9E-B9F BA3-BA4 BA8-BAA BAE-BB9 BD0 C05-C0C "
    "C0E-C10 C12-C28 C2A-C39 C3D C58-C5A C5D C60-C61 C80 C85-C8C C8E-C90 C92-CA8 CAA-CB3 CB5-CB9 CBD CDD-CDE "
    "CE0-CE1 CF1-CF2 D04-D0C D0E-D10 D12-D3A D3D D4E D54-D56 D5F-D61 D7A-D7F D85-D96 D9A-DB1 DB3-DBB DBD DC0-DC6 "
    "E01-E30 E32-E33 E40-E46 E81-E82 E84 E86-E8A E8C-EA3 EA5 EA7-EB0 EB2-EB3 EBD EC0-EC4 EC6 EDC-EDF F00 F40-F47 "
    "F49-F6C F88-F8C 1000-102A 103F 1050-1055 105A-105D 1061 1065-1066 106E-1070 1075-1081 108E 10A0-10C5 10C7 "
    "10CD 10D0-10FA 10FC-1248 124A-124D 1250-1256 1258 125A-125D 1260-1288 128A-128D 1290-12B0 12B2-12B5 "
    "12B8-12BE 12C0 12C2-12C5 12C8-12D6 12D8-1310 1312-1315 1318-135A 1380-138F 13A0-13F5 13F8-13FD 1401-166C "
    "166F-167F 1681-169A 16A0-16EA 16F1-16F8 1700-1711 171F-1731 1740-1751 1760-176C 176E-1770 1780-17B3 17D7 "
    "17DC 1820-1878 1880-1884 1887-18A8 18AA 18B0-18F5 1900-191E 1950-196D 1970-1974 1980-19AB 19B0-19C9 "
    "1A00-1A16 1A20-1A54 1AA7 1B05-1B33 1B45-1B4C 1B83-1BA0 1BAE-1BAF 1BBA-1BE5 1C00-1C23 1C4D-1C4F 1C5A-1C7D "
    "1C80-1C8A 1C90-1CBA 1CBD-1CBF 1CE9-1CEC 1CEE-1CF3 1CF5-1CF6 1CFA 1D00-1DBF 1E00-1F15 1F18-1F1D 1F20-1F45 "
    "1F48-1F4D 1F50-1F57 1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 "
    "1FD6-1FDB 1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2071 207F 2090-209C 2102 2107 210A-2113 2115 2119-211D 2124 2126 "
    "2128 212A-212D 212F-2139 213C-213F 2145-2149 214E 2183-2184 2C00-2CE4 2CEB-2CEE 2CF2-2CF3 2D00-2D25 2D27 "
    "2D2D 2D30-2D67 2D6F 2D80-2D96 2DA0-2DA6 2DA8-2DAE 2DB0-2DB6 2DB8-2DBE 2DC0-2DC6 2DC8-2DCE 2DD0-2DD6 "
    "2DD8-2DDE 2E2F 3005-3006 3031-3035 303B-303C 3041-3096 309D-309F 30A1-30FA 30FC-30FF 3105-312F 3131-318E "
    "31A0-31BF 31F0-31FF 3400-4DBF 4E00-A48C A4D0-A4FD A500-A60C A610-A61F A62A-A62B A640-A66E A67F-A69D "
    "A6A0-A6E5 A717-A71F A722-A788 A78B-A7CD A7D0-A7D1 A7D3 A7D5-A7DC A7F2-A801 A803-A805 A807-A80A A80C-A822 "
    "A840-A873 A882-A8B3 A8F2-A8F7 A8FB A8FD-A8FE A90A-A925 A930-A946 A960-A97C A984-A9B2 A9CF A9E0-A9E4 "
    "A9E6-A9EF A9FA-A9FE AA00-AA28 AA40-AA42 AA44-AA4B AA60-AA76 AA7A AA7E-AAAF AAB1 AAB5-AAB6 AAB9-AABD AAC0 "
    "AAC2 AADB-AADD AAE0-AAEA AAF2-AAF4 AB01-AB06 AB09-AB0E AB11-AB16 AB20-AB26 AB28-AB2E AB30-AB5A AB5C-AB69 "
    "AB70-ABE2 AC00-D7A3 D7B0-D7C6 D7CB-D7FB F900-FA6D FA70-FAD9 FB00-FB06 FB13-FB17 FB1D FB1F-FB28 FB2A-FB36 "
    "FB38-FB3C FB3E FB40-FB41 FB43-FB44 FB46-FBB1 FBD3-FD3D FD50-FD8F FD92-FDC7 FDF0-FDFB FE70-FE74 FE76-FEFC "
    "FF21-FF3A FF41-FF5A FF66-FFBE FFC2-FFC7 FFCA-FFCF FFD2-FFD7 FFDA-FFDC 10000-1000B 1000D-10026 10028-1003A "
    "1003C-1003D 1003F-1004D 10050-1005D 10080-100FA 10280-1029C 102A0-102D0 10300-1031F 1032D-10340 10342-10349 "
    "10350-10375 10380-1039D 103A0-103C3 103C8-103CF 10400-1049D 104B0-104D3 104D8-104FB 10500-10527 10530-10563 "
    "10570-1057A 1057C-1058A 1058C-10592 10594-10595 10597-105A1 105A3-105B1 105B3-105B9 105BB-105BC 105C0-105F3 "
    "10600-10736 10740-10755 10760-10767 10780-10785 10787-107B0 107B2-107BA 10800-10805 10808 1080A-10835 "
    "10837-10838 1083C 1083F-10855 10860-10876 10880-1089E 108E0-108F2 108F4-108F5 10900-10915 10920-10939 "
    "10980-109B7 109BE-109BF 10A00 10A10-10A13 10A15-10A17 10A19-10A35 10A60-10A7C 10A80-10A9C 10AC0-10AC7 "
    "10AC9-10AE4 10B00-10B35 10B40-10B55 10B60-10B72 10B80-10B91 10C00-10C48 10C80-10CB2 10CC0-10CF2 10D00-10D23 "
    "10D4A-10D65 10D6F-10D85 10E80-10EA9 10EB0-10EB1 10EC2-10EC4 10F00-10F1C 10F27 10F30-10F45 10F70-10F81 "
    "10FB0-10FC4 10FE0-10FF6 11003-11037 11071-11072 11075 11083-110AF 110D0-110E8 11103-11126 11144 11147 "
    "11150-11172 11176 11183-111B2 111C1-111C4 111DA 111DC 11200-11211 11213-1122B 1123F-11240 11280-11286 11288 "
    "1128A-1128D 1128F-1129D 1129F-112A8 112B0-112DE 11305-1130C 1130F-11310 11313-11328 1132A-11330 11332-11333 "
    "11335-11339 1133D 11350 1135D-11361 11380-11389 1138B 1138E 11390-113B5 113B7 113D1 113D3 11400-11434 "
    "11447-1144A 1145F-11461 11480-114AF 114C4-114C5 114C7 11580-115AE 115D8-115DB 11600-1162F 11644 11680-116AA "
    "116B8 11700-1171A 11740-11746 11800-1182B 118A0-118DF 118FF-11906 11909 1190C-11913 11915-11916 11918-1192F "
    "1193F 11941 119A0-119A7 119AA-119D0 119E1 119E3 11A00 11A0B-11A32 11A3A 11A50 11A5C-11A89 11A9D 11AB0-11AF8 "
    "11BC0-11BE0 11C00-11C08 11C0A-11C2E 11C40 11C72-11C8F 11D00-11D06 11D08-11D09 11D0B-11D30 11D46 11D60-11D65 "
    "11D67-11D68 11D6A-11D89 11D98 11EE0-11EF2 11F02 11F04-11F10 11F12-11F33 11FB0 12000-12399 12480-12543 "
    "12F90-12FF0 13000-1342F 13441-13446 13460-143FA 14400-14646 16100-1611D 16800-16A38 16A40-16A5E 16A70-16ABE "
    "16AD0-16AED 16B00-16B2F 16B40-16B43 16B63-16B77 16B7D-16B8F 16D40-16D6C 16E40-16E7F 16F00-16F4A 16F50 "
    "16F93-16F9F 16FE0-16FE1 16FE3 17000-187F7 18800-18CD5 18CFF-18D08 1AFF0-1AFF3 1AFF5-1AFFB 1AFFD-1AFFE "
    "1B000-1B122 1B132 1B150-1B152 1B155 1B164-1B167 1B170-1B2FB 1BC00-1BC6A 1BC70-1BC7C 1BC80-1BC88 1BC90-1BC99 "
    "1D400-1D454 1D456-1D49C 1D49E-1D49F 1D4A2 1D4A5-1D4A6 1D4A9-1D4AC 1D4AE-1D4B9 1D4BB 1D4BD-1D4C3 1D4C5-1D505 "
    "1D507-1D50A 1D50D-1D514 1D516-1D51C 1D51E-1D539 1D53B-1D53E 1D540-1D544 1D546 1D54A-1D550 1D552-1D6A5 "
    "1D6A8-1D6C0 1D6C2-1D6DA 1D6DC-1D6FA 1D6FC-1D714 1D716-1D734 1D736-1D74E 1D750-1D76E 1D770-1D788 1D78A-1D7A8 "
    "1D7AA-1D7C2 1D7C4-1D7CB 1DF00-1DF1E 1DF25-1DF2A 1E030-1E06D 1E100-1E12C 1E137-1E13D 1E14E 1E290-1E2AD "
    "1E2C0-1E2EB 1E4D0-1E4EB 1E5D0-1E5ED 1E5F0 1E7E0-1E7E6 1E7E8-1E7EB 1E7ED-1E7EE 1E7F0-1E7FE 1E800-1E8C4 "
    "1E900-1E943 1E94B 1EE00-1EE03 1EE05-1EE1F 1EE21-1EE22 1EE24 1EE27 1EE29-1EE32 1EE34-1EE37 1EE39 1EE3B 1EE42 "
    "1EE47 1EE49 1EE4B 1EE4D-1EE4F 1EE51-1EE52 1EE54 1EE57 1EE59 1EE5B 1EE5D 1EE5F 1EE61-1EE62 1EE64 1EE67-1EE6A "
    "1EE6C-1EE72 1EE74-1EE77 1EE79-1EE7C 1EE7E 1EE80-1EE89 1EE8B-1EE9B 1EEA1-1EEA3 1EEA5-1EEA9 1EEAB-1EEBB "
    "20000-2A6DF 2A700-2B739 2B740-2B81D 2B820-2CEA1 2CEB0-2EBE0 2EBF0-2EE5D 2F800-2FA1D 30000-3134A 31350-323AF "
)
_N_RANGES = (
    "30-39 B2-B3 B9 BC-BE 660-669 6F0-6F9 7C0-7C9 966-96F 9E6-9EF 9F4-9F9 A66-A6F AE6-AEF B66-B6F B72-B77 "
    "BE6-BF2 C66-C6F C78-C7E CE6-CEF D58-D5E D66-D78 DE6-DEF E50-E59 ED0-ED9 F20-F33 1040-1049 1090-1099 "
    "1369-137C 16EE-16F0 17E0-17E9 17F0-17F9 1810-1819 1946-194F 19D0-19DA 1A80-1A89 1A90-1A99 1B50-1B59 "
    "1BB0-1BB9 1C40-1C49 1C50-1C59 2070 2074-2079 2080-2089 2150-2182 2185-2189 2460-249B 24EA-24FF 2776-2793 "
    "2CFD 3007 3021-3029 3038-303A 3192-3195 3220-3229 3248-324F 3251-325F 3280-3289 32B1-32BF A620-A629 "
    "A6E6-A6EF A830-A835 A8D0-A8D9 A900-A909 A9D0-A9D9 A9F0-A9F9 AA50-AA59 ABF0-ABF9 FF10-FF19 10107-10133 "
    "10140-10178 1018A-1018B 102E1-102FB 10320-10323 10341 1034A 103D1-103D5 104A0-104A9 10858-1085F 10879-1087F "
    "108A7-108AF 108FB-108FF 10916-1091B 109BC-109BD 109C0-109CF 109D2-109FF 10A40-10A48 10A7D-10A7E 10A9D-10A9F "
    "10AEB-10AEF 10B58-10B5F 10B78-10B7F 10BA9-10BAF 10CFA-10CFF 10D30-10D39 10D40-10D49 10E60-10E7E 10F1D-10F26 "
    "10F51-10F54 10FC5-10FCB 11052-1106F 110F0-110F9 11136-1113F 111D0-111D9 111E1-111F4 112F0-112F9 11450-11459 "
    "114D0-114D9 11650-11659 116C0-116C9 116D0-116E3 11730-1173B 118E0-118F2 11950-11959 11BF0-11BF9 11C50-11C6C "
    "11D50-11D59 11DA0-11DA9 11F50-11F59 11FC0-11FD4 12400-1246E 16130-16139 16A60-16A69 16AC0-16AC9 16B50-16B59 "
    "16B5B-16B61 16D70-16D79 16E80-16E96 1CCF0-1CCF9 1D2C0-1D2D3 1D2E0-1D2F3 1D360-1D378 1D7CE-1D7FF 1E140-1E149 "
    "1E2F0-1E2F9 1E4F0-1E4F9 1E5F1-1E5FA 1E8C7-1E8CF 1E950-1E959 1EC71-1ECAB 1ECAD-1ECAF 1ECB1-1ECB4 1ED01-1ED2D "
    "1ED2F-1ED3D 1F100-1F10C 1FBF0-1FBF9 "
)
# Unicode White_Space: what `\s` matches in both Oniguruma and Rust's regex (checked per character anyway).
_WS_RANGES = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
              (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))
_O, _L, _N, _S = 0, 1, 2, 3  # pre-tokenizer character classes: other, letter, number, whitespace


def _parse_ranges(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split():
        a, _, b = item.partition("-")
        out.append((int(a, 16), int(b or a, 16)))
    return out


_L_TAB = _parse_ranges("".join(_L_RANGES))
_N_TAB = _parse_ranges("".join(_N_RANGES))
_TAB = sorted([(a, b, _L) for a, b in _L_TAB] + [(a, b, _N) for a, b in _N_TAB] + [(a, b, _S) for a, b in _WS_RANGES])
_TAB_STARTS = [a for a, _, _ in _TAB]


def char_class(cp: int) -> int:
    """Class of a code point in the fast path's pattern: _L, _N, _S or _O."""
    k = bisect.bisect_right(_TAB_STARTS, cp) - 1
    if k >= 0 and _TAB[k][1] >= cp:
        return _TAB[k][2]
    return _O


def _rx_class(ranges) -> str:
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)


_RX_L, _RX_N, _RX_S = _rx_class(_L_TAB), _rx_class(_N_TAB), _rx_class(_WS_RANGES)
# The GPT-2 pattern with explicit classes and `\s+(?!\S)|\s+` replaced by `\s+` (see module doc); the sentinel is in
# no class, so it is skipped and ends any piece.
PATTERN = (f"'s|'t|'re|'ve|'m|'ll|'d| ?[{_RX_L}]+| ?[{_RX_N}]+| ?[^{_RX_S}{_RX_L}{_RX_N}\\x{{1E}}]+|[{_RX_S}]+")

_MB_WS_CPS = np.asarray([c for a, b in _WS_RANGES for c in range(a, b + 1) if c >= 0x80], dtype=np.int64)

# code point -> whether HF's pre-tokenizer classifies it as `char_class` does (filled lazily, per process).
_CHAR_OK: dict[int, bool] = {}
_LOCK = threading.RLock()


class Unsupported(Exception):
    """The tokenizer is not one the fast path can reproduce exactly."""


@dataclass
class TokenBatch:
    """Tokens of several texts, flat: text i has ids[bounds[i]:bounds[i+1]] and char offsets offsets[same]."""

    ids: np.ndarray  # int64 (T,)
    offsets: np.ndarray  # int64 (T, 2), (start, end) in characters of its own text, exactly as HF reports them
    bounds: np.ndarray  # int64 (n + 1,)
    n_fallback: int = 0  # texts that were encoded by the HF backend instead

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def text_ids(self, i: int) -> list[int]:
        return self.ids[self.bounds[i]:self.bounds[i + 1]].tolist()

    def text_offsets(self, i: int) -> list[tuple[int, int]]:
        return [tuple(o) for o in self.offsets[self.bounds[i]:self.bounds[i + 1]].tolist()]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which HF's ByteLevel uses (checked against HF at build time)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_B2U = _bytes_to_unicode()
_U2B = {ord(c): b for b, c in _B2U.items()}


def _state(component) -> dict | None:
    if component is None:
        return None
    return json.loads(component.__getstate__())


def _post_processor_tokens(state) -> tuple[list[int], list[int]]:
    """Ids a supported post-processor adds before and after a single sequence."""
    if state is None:
        return [], []
    kind = state.get("type")
    if kind == "ByteLevel":
        if state.get("trim_offsets", True):
            raise Unsupported("ByteLevel post-processor with trim_offsets")
        return [], []
    if kind == "Sequence":
        pre, post = [], []
        for sub in state.get("processors", []):
            p, s = _post_processor_tokens(sub)
            pre, post = p + pre, post + s
        return pre, post
    if kind == "TemplateProcessing":
        pre, post, seen = [], [], False
        specials = state.get("special_tokens", {})
        for item in state.get("single", []):
            if "Sequence" in item:
                if item["Sequence"].get("id") != "A" or seen:
                    raise Unsupported("unusual template")
                seen = True
            elif "SpecialToken" in item:
                ids = specials[item["SpecialToken"]["id"]]["ids"]
                (post if seen else pre).extend(ids)
            else:
                raise Unsupported("unusual template")
        if not seen:
            raise Unsupported("template without the sequence")
        return pre, post
    raise Unsupported(f"post-processor {kind}")


def default_cache_dir() -> Path:
    base = os.environ.get("IMTUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "imtune")
    return Path(base) / "fast_tokenize"


def _merges_self_consistent(model, strs: list[str], ids: list[int]) -> bool:
    """K3: HF's own BPE encodes every merged token to itself."""
    tokenize = model.tokenize
    for s, i in zip(strs, ids, strict=True):
        r = tokenize(s)
        if len(r) != 1 or r[0].id != i:
            return False
    return True


def hf_char_classes(pre_tokenizer, chars: list[str]) -> list[int | None]:
    """How HF's GPT-2 pre-tokenizer classes each character, read off piece boundaries in a probe text.

    For each c the probe holds "a"+c, "1"+c and "!"+c (each after a NUL, which forces a boundary): c continues the
    piece of "a" iff it is a letter, of "1" iff a number, of "!" iff neither letter, number nor space.
    """
    probe = "".join(f"\x00a{c}\x001{c}\x00!{c}" for c in chars) + "\x00"
    starts = {s for _, (s, _e) in pre_tokenizer.pre_tokenize_str(probe)}
    out: list[int | None] = []
    for k in range(len(chars)):
        b = 9 * k
        joined = [(b + 2) not in starts, (b + 5) not in starts, (b + 8) not in starts]
        if sum(joined) > 1:
            out.append(None)
        else:
            out.append(_L if joined[0] else _N if joined[1] else _O if joined[2] else _S)
    return out


def derive_class_tables(pre_tokenizer, step: int = 20000) -> dict[int, list[tuple[int, int]]]:
    """Letter and number ranges as `pre_tokenizer` classes every code point (about a minute): regenerates
    `_L_RANGES`/`_N_RANGES` for a new tokenizers release."""
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    cls = {}
    for i in range(0, len(cps), step):
        chunk = cps[i:i + step]
        cls.update(zip(chunk, hf_char_classes(pre_tokenizer, [chr(c) for c in chunk]), strict=True))
    out: dict[int, list[tuple[int, int]]] = {_L: [], _N: []}
    for k, ranges in out.items():
        start = None
        for c in range(0x110001):
            if cls.get(c) == k:
                start = c if start is None else start
            elif start is not None:
                ranges.append((start, c - 1))
                start = None
    return out


def _check_chars(pre_tokenizer, cps: list[int]):
    """Record, for each code point, whether HF classes it as the fast path's pattern does."""
    todo = [cp for cp in cps if cp not in _CHAR_OK and not 0xD800 <= cp <= 0xDFFF]
    if not todo:
        return
    got = hf_char_classes(pre_tokenizer, [chr(cp) for cp in todo])
    with _LOCK:
        for cp, cls in zip(todo, got, strict=True):
            _CHAR_OK[cp] = cls is not None and cls == char_class(cp)


def _code_points(B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and code points of the characters >= U+0080 in valid UTF-8 bytes."""
    lead = np.flatnonzero(B >= 0xC0)
    if not len(lead):
        return lead, lead
    n = len(B)
    b0 = B[lead].astype(np.int64)
    b1 = B[np.minimum(lead + 1, n - 1)].astype(np.int64) & 0x3F
    b2 = B[np.minimum(lead + 2, n - 1)].astype(np.int64) & 0x3F
    b3 = B[np.minimum(lead + 3, n - 1)].astype(np.int64) & 0x3F
    cp = np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1,
                  np.where(b0 < 0xF0, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                           ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
    return lead, cp


_POOL = ForkSafePool(8, "imtune-tok")


def _reset_lock_in_child():
    global _LOCK
    _LOCK = threading.RLock()  # a lock held by a parent thread at fork time would never be released in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def default_threads() -> int:
    """`IMTUNE_TOKENIZE_THREADS`, else the CPUs this process may use (at most 8)."""
    env = os.environ.get("IMTUNE_TOKENIZE_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _compile_model(model_json: bytes, live_model) -> dict:
    """What the fast path needs from the HF BPE model: merged tokens' bytes (concatenated) and lengths in merge order,
    their ids, the ids of the 256 byte symbols, and the K1/K3 verdict. A pure function of the model's JSON (K3 runs
    `live_model`, whose JSON this is), so it is cached on disk under the JSON's hash."""
    model = json.loads(model_json)
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("byte_fallback") or model.get("ignore_merges"):
        return {"unsupported": "BPE options"}
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    pairs = [m.split(" ") for m in merges] if merges and isinstance(merges[0], str) else merges
    if any(len(p) != 2 for p in pairs):
        return {"unsupported": "merges format"}
    strs = [a + b for a, b in pairs]
    joined = "".join(strs)
    if not set(joined) <= set(_B2U.values()):
        return {"unsupported": "merged tokens outside the byte-level alphabet"}
    try:
        merged_ids = [vocab[s] for s in strs]
    except KeyError:
        return {"unsupported": "merged token missing from the vocab"}
    raw = joined.translate(_U2B).encode("latin-1")
    lens = np.fromiter(map(len, strs), dtype=np.int32, count=len(strs))
    if len(set(strs)) != len(strs):
        return {"unsupported": "a token is produced by two merges (K1)"}
    if not _merges_self_consistent(live_model, strs, merged_ids):
        return {"unsupported": "a merged token is not its own BPE encoding (K3)"}
    # a byte whose symbol is not in the vocab is dropped by HF (or made <unk>), which BPE cannot mimic: texts holding
    # one are left to HF (for SmolLM2: a few control characters, and bytes that never occur in valid UTF-8)
    return {"raw": raw, "lens": lens, "merged_ids": np.asarray(merged_ids, dtype=np.int64),
            "byte_ids": np.asarray([vocab.get(_B2U[b], -1) for b in range(256)], dtype=np.int64)}


def _load_compiled(cache_dir, key) -> dict | None:
    if cache_dir is None:
        return None
    try:
        with np.load(Path(cache_dir) / f"{key}.npz", allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("algo") != ALGO_VERSION:
                return None
            if meta.get("unsupported"):
                return {"unsupported": meta["unsupported"]}
            out = {"raw": z["raw"].tobytes(), "lens": z["lens"], "merged_ids": z["merged_ids"],
                   "byte_ids": z["byte_ids"]}
        if len(out["lens"]) != len(out["merged_ids"]) or int(out["lens"].sum()) != len(out["raw"]) \
                or len(out["byte_ids"]) != 256:
            return None
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_compiled(cache_dir, key, comp: dict):
    if cache_dir is None:
        return
    meta = json.dumps({"algo": ALGO_VERSION, "unsupported": comp.get("unsupported")}).encode()
    arrays = {"meta": np.frombuffer(meta, dtype=np.uint8)}
    if not comp.get("unsupported"):
        arrays.update(raw=np.frombuffer(comp["raw"], dtype=np.uint8), lens=comp["lens"],
                      merged_ids=comp["merged_ids"], byte_ids=comp["byte_ids"])
    try:
        d = Path(cache_dir)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.{threading.get_ident()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, d / f"{key}.npz")
    except OSError:
        pass


class FastBPE:
    """tiktoken-backed twin of a HF byte-level BPE backend; `encode_batch` = HF ids and offsets (see module doc).

    `cache_dir`: where the compiled model (and its K1/K3 verdict) is kept, keyed by the sha256 of the model's JSON;
    None = `default_cache_dir()`, False = no disk cache (compile every time).
    """

    def __init__(self, backend, cache_dir=None):
        import tiktoken
        import tokenizers

        if backend.normalizer is not None:
            raise Unsupported("normalizer")
        pre = _state(backend.pre_tokenizer)
        if not pre or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
            raise Unsupported(f"pre-tokenizer {pre and pre.get('type')}")
        self.prefix_ids, self.suffix_ids = _post_processor_tokens(_state(backend.post_processor))

        added = sorted(backend.get_added_tokens_decoder().items())
        contents = [t.content for _, t in added]
        if any(t.lstrip or t.rstrip or t.single_word for _, t in added):
            raise Unsupported("added token with lstrip/rstrip/single_word")
        if len({t.normalized for _, t in added}) > 1:
            raise Unsupported("added tokens with mixed `normalized`")
        if any(not c or SENTINEL in c or any(char_class(ord(ch)) == _S for ch in c) for c in contents):
            raise Unsupported("added token empty or containing whitespace")
        srt = sorted(contents)
        if any(b.startswith(a) for a, b in zip(srt, srt[1:], strict=False)):
            raise Unsupported("an added token is a prefix of another")

        # the byte <-> character map and the character classes of ASCII, checked against HF itself
        self._pre = backend.pre_tokenizer
        sample = "".join(chr(c) for c in range(32, 127)) + "\xa1\xbf\xc0\xdf\u0800\uffff\U00010000\U0010ffff"
        want = "".join(_B2U[b] for b in sample.encode("utf-8"))
        got = "".join(p for p, _ in self._pre.pre_tokenize_str(sample))
        if got != want:
            raise Unsupported("byte-level alphabet differs")
        _check_chars(self._pre, list(range(128)))
        if not all(_CHAR_OK[cp] for cp in range(128) if cp != _SENT_B):
            raise Unsupported("ASCII character classes differ")

        model_json = backend.model.__getstate__()
        key = hashlib.sha256(model_json + ALGO_VERSION.encode() + tokenizers.__version__.encode()).hexdigest()
        cache_dir = None if cache_dir is False else (default_cache_dir() if cache_dir is None else cache_dir)
        comp = _load_compiled(cache_dir, key)
        if comp is None:
            comp = _compile_model(model_json, backend.model)
            _save_compiled(cache_dir, key, comp)
        if comp.get("unsupported"):
            raise Unsupported(comp["unsupported"])

        raw, lens = comp["raw"], comp["lens"]
        n_merged = len(lens)
        ends = np.cumsum(lens, dtype=np.int64).tolist()
        ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        ranks.update(zip([raw[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)], range(256, 256 + n_merged),
                         strict=True))
        if len(ranks) != 256 + n_merged:
            raise Unsupported("a token is produced by two merges (K1)")
        byte_ids = comp["byte_ids"]
        self._byte_bad = byte_ids < 0
        self._byte_bad[_SENT_B] = False  # the separator never reaches the BPE
        self._bad_ascii = [b for b in range(128) if self._byte_bad[b]]
        self._bad_ascii_are_controls = all(b < 32 and not 9 <= b <= 13 or b == 127 for b in self._bad_ascii)
        self._cp_known: dict[int, bool] = {}

        specials = {c: 256 + n_merged + k for k, c in enumerate(contents)}
        self.rank_to_id = np.concatenate([byte_ids, comp["merged_ids"], np.asarray([i for i, _ in added], np.int64)])
        self.rank_len = np.concatenate([np.ones(256, np.int64), lens.astype(np.int64),
                                        np.asarray([len(c.encode("utf-8")) for c in contents], np.int64)])
        self._special_bytes = [c.encode("utf-8") for c in contents]
        self._special_first = np.zeros(256, dtype=bool)
        for sb in self._special_bytes:
            self._special_first[sb[0]] = True
        self._allowed = frozenset(contents)
        self.enc = tiktoken.Encoding(f"imtune-{key[:12]}", pat_str=PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self._backend = backend

    # ---------------------------------------------------------------- encoding
    def encode_batch(self, texts, add_special_tokens: bool = True, num_threads: int | None = None) -> TokenBatch:
        texts = list(texts)
        n = len(texts)
        slow, joined, G, lead, cp = self._screen(texts)
        fast = [i for i in range(n) if i not in slow] if slow else None
        f_ids, f_off, f_bounds = self._encode_fast(len(fast) if slow else n, joined, G, lead, cp, num_threads)
        if add_special_tokens and (self.prefix_ids or self.suffix_ids):
            f_ids, f_off, f_bounds = self._add_template(f_ids, f_off, f_bounds)
        if not slow:
            return TokenBatch(f_ids, f_off, f_bounds)
        # some texts go through HF; stitch everything back in order
        slow_idx = sorted(slow)
        encs = self._backend.encode_batch([texts[i] for i in slow_idx], add_special_tokens=add_special_tokens)
        by_slow = dict(zip(slow_idx, encs, strict=True))
        fpos = {i: k for k, i in enumerate(fast)}
        parts_ids, parts_off = [], []
        for i in range(n):
            if i in by_slow:
                e = by_slow[i]
                parts_ids.append(np.asarray(e.ids, dtype=np.int64))
                parts_off.append(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
            else:
                k = fpos[i]
                parts_ids.append(f_ids[f_bounds[k]:f_bounds[k + 1]])
                parts_off.append(f_off[f_bounds[k]:f_bounds[k + 1]])
        bounds = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts_ids], out=bounds[1:])
        return TokenBatch(np.concatenate(parts_ids), np.concatenate(parts_off), bounds, n_fallback=len(slow))

    def _screen(self, texts: list[str]):
        """Split off the texts the fast path must not take (the sentinel inside, lone surrogates, a byte the vocab
        lacks, a character HF classes differently). Returns (their indices, then for the others: joined text, its
        UTF-8, and the positions and code points of its non-ASCII characters)."""
        slow: set[int] = set()
        joined = SENTINEL.join(texts)
        if joined.count(SENTINEL) != max(len(texts) - 1, 0):
            slow |= {i for i, t in enumerate(texts) if SENTINEL in t}
        G = None
        if not slow:
            try:
                G = joined.encode("utf-8")
            except UnicodeEncodeError:
                slow |= {i for i, t in enumerate(texts) if not _utf8_ok(t)}
        for _ in range(3):  # a second pass only when some texts were set aside
            keep = [i for i in range(len(texts)) if i not in slow]
            if G is None:
                joined = SENTINEL.join(texts[i] for i in keep)
                G = joined.encode("utf-8")
            B = np.frombuffer(G, dtype=np.uint8)
            bad_pos = [self._bad_ascii_positions(B)] if self._bad_ascii else []
            lead = cp = None
            if not joined.isascii():
                lead, cp = _code_points(B)
                cps = np.unique(cp).tolist()
                _check_chars(self._pre, cps)
                bad = [c for c in cps if not (_CHAR_OK.get(c, False) and self._bytes_known(c))]
                if bad:
                    bad_pos.append(lead[np.isin(cp, bad)])
            bad_pos = np.concatenate(bad_pos) if bad_pos else np.zeros(0, np.int64)
            if not len(bad_pos):
                return slow, joined, G, lead, cp
            seps = np.flatnonzero(B == _SENT_B)
            slow |= {keep[k] for k in np.unique(np.searchsorted(seps, bad_pos)).tolist()}
            G = None
        raise RuntimeError("fast tokenizer: screening did not converge")  # never expected

    def _bad_ascii_positions(self, B: np.ndarray) -> np.ndarray:
        if self._bad_ascii_are_controls:  # cheap pre-filter: controls other than \t..\r are rare in text
            cand = np.flatnonzero((B < 9) | ((B > 13) & (B < 32)) | (B == 127))
            return cand[self._byte_bad[B[cand]]]
        return np.flatnonzero(np.take(self._byte_bad, B))

    def _bytes_known(self, cp: int) -> bool:
        ok = self._cp_known.get(cp)
        if ok is None:
            ok = self._cp_known[cp] = not any(self._byte_bad[b] for b in chr(cp).encode("utf-8"))
        return ok

    def _encode_fast(self, n: int, joined: str, G: bytes, lead, cp, num_threads: int | None):
        if n == 0:
            return np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(1, np.int64)
        B = np.frombuffer(G, dtype=np.uint8)
        ascii_only = lead is None
        # byte extent of each text in G (every 0x1E in G is a separator: texts holding one were screened out)
        seps = np.flatnonzero(B == _SENT_B)
        g_start = np.zeros(n, dtype=np.int64)
        g_start[1:] = seps + 1
        g_end = np.empty(n, dtype=np.int64)
        g_end[:-1] = seps
        g_end[-1] = len(B)
        T = np.zeros(n + 1, dtype=np.int64)  # text starts in separator-free byte coordinates
        np.cumsum(g_end - g_start, out=T[1:])
        char_of = None if ascii_only else np.cumsum((B & 0xC0) != 0x80, dtype=np.int32) - 1  # char index per byte

        cut = self._lookahead_cuts(B, G, lead, cp)
        if len(cut):
            cpos = (cut if ascii_only else char_of[cut]).tolist()
            text = SENTINEL.join([joined[a:b] for a, b in zip([0, *cpos], [*cpos, len(joined)], strict=True)])
        else:
            text = joined
        ranks = self._run(text, num_threads)

        lens = np.take(self.rank_len, ranks)
        tok_end = np.cumsum(lens)
        tok_start = tok_end - lens
        bounds = np.searchsorted(tok_start, T, side="left")
        first = bounds[:-1]
        has = first < len(tok_start)
        if (tok_end[-1] if len(tok_end) else 0) != T[-1] or (tok_start[first[has]] != T[:-1][has]).any():
            raise RuntimeError("fast tokenizer: tokens do not tile the texts")  # never expected
        counts = np.diff(bounds)
        off = np.empty((len(ranks), 2), dtype=np.int64)
        if ascii_only:
            base = np.repeat(T[:-1], counts)
            off[:, 0] = tok_start - base
            off[:, 1] = tok_end - base
        else:
            tix = np.repeat(np.arange(n, dtype=np.int64), counts)
            gs = tok_start + tix  # G coordinates: one separator byte before every text but the first
            base = np.repeat(char_of[np.minimum(g_start, len(B) - 1)], counts)
            off[:, 0] = char_of[gs] - base
            off[:, 1] = char_of[gs + lens - 1] + 1 - base
        return np.take(self.rank_to_id, ranks), off, bounds

    def _lookahead_cuts(self, B: np.ndarray, G: bytes, lead, cp) -> np.ndarray:
        """Byte positions where `\\s+(?!\\S)` ends a whitespace run: before the last whitespace character of a run
        of two or more that a non-space character follows (not the end of a text, and not an added token, which HF
        splits off first, making the run end its segment)."""
        nb = len(B)
        if nb < 3:
            return np.zeros(0, dtype=np.int64)
        ws = (B == 32) | ((B >= 9) & (B <= 13))
        mb = None
        if lead is not None:
            sel = np.isin(cp, _MB_WS_CPS)
            if sel.any():
                mb, mb_cp = lead[sel], cp[sel]
        if mb is not None:
            mb_len = np.where(mb_cp < 0x800, 2, 3)
            for k in range(3):
                m = mb_len > k
                ws[mb[m] + k] = True
        # e: last byte of a whitespace run whose byte before is whitespace too, followed by a non-space byte
        e = np.flatnonzero(ws[:-2] & ws[1:-1] & ~ws[2:]) + 1
        q = e
        if mb is not None:
            multi = B[e] >= 0x80  # the run's last character is multi-byte: find where it starts
            if multi.any():
                q = e.copy()
                em = e[multi]
                q[multi] = np.where(B[em - 1] == 0xC2, em - 1, em - 2)
                ok = (q > 0) & ws[np.maximum(q - 1, 0)]
                q, e = q[ok], e[ok]
        nxt = e + 1
        b_next = B[nxt]
        keep = b_next != _SENT_B
        maybe = keep & self._special_first[b_next]
        if maybe.any():
            for k in np.flatnonzero(maybe).tolist():
                p = int(nxt[k])
                if any(G.startswith(sb, p) for sb in self._special_bytes):
                    keep[k] = False
        return q[keep]

    def _run(self, text: str, num_threads: int | None) -> np.ndarray:
        nt = default_threads() if num_threads is None else max(1, num_threads)
        enc, allowed = self.enc, self._allowed
        if nt == 1 or len(text) < 200_000:
            return enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())
        cuts = [0]
        for k in range(1, nt):
            p = text.find(SENTINEL, max(cuts[-1], len(text) * k // nt))
            if p < 0:
                break
            cuts.append(p)
        cuts.append(len(text))
        chunks = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        outs = list(_POOL.get().map(lambda s: enc.encode_to_numpy(s, allowed_special=allowed, disallowed_special=()),
                                chunks))
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _add_template(self, ids, off, bounds):
        npre, nsuf = len(self.prefix_ids), len(self.suffix_ids)
        n = len(bounds) - 1
        counts = np.diff(bounds)
        new_bounds = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts + npre + nsuf, out=new_bounds[1:])
        out_ids = np.empty(new_bounds[-1], dtype=np.int64)
        out_off = np.zeros((new_bounds[-1], 2), dtype=np.int64)
        tix = np.repeat(np.arange(n, dtype=np.int64), counts)
        pos = np.arange(len(ids), dtype=np.int64) + tix * (npre + nsuf) + npre
        out_ids[pos] = ids
        out_off[pos] = off
        for k, t in enumerate(self.prefix_ids):
            out_ids[new_bounds[:-1] + k] = t
        for k, t in enumerate(self.suffix_ids):
            out_ids[new_bounds[1:] - nsuf + k] = t
        return out_ids, out_off, new_bounds


def _utf8_ok(t: str) -> bool:
    try:
        t.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ------------------------------------------------------------------- per-tokenizer cache
_ENCODERS: dict[int, tuple] = {}


def _backend_of(tokenizer):
    be = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if be is None and hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "model"):
        be = tokenizer  # a bare tokenizers.Tokenizer
    return be


def _fingerprint(be) -> tuple:
    return (be.get_vocab_size(with_added_tokens=True),
            *(None if c is None else c.__getstate__() for c in (be.normalizer, be.pre_tokenizer, be.post_processor)))


def fast_encoder(tokenizer, cache_dir=None) -> FastBPE | None:
    """The exact fast twin of `tokenizer`'s backend, or None when it is not supported (use the backend then).

    Built once per backend object (rebuilt if its vocabulary or pipeline changes). `IMTUNE_FAST_TOKENIZE=0` turns
    the fast path off.
    """
    if os.environ.get("IMTUNE_FAST_TOKENIZE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    be = _backend_of(tokenizer)
    if be is None:
        return None
    try:
        if be.truncation is not None or be.padding is not None or be.encode_special_tokens:
            return None
        fp = _fingerprint(be)
    except Exception:
        return None
    with _LOCK:
        hit = _ENCODERS.get(id(be))
        if hit is not None and hit[0] is be and hit[1] == fp:
            return hit[2]
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        fe = None
    else:
        try:
            fe = FastBPE(be, cache_dir=cache_dir)
        except Unsupported:
            fe = None
    with _LOCK:
        if len(_ENCODERS) >= 16:
            _ENCODERS.pop(next(iter(_ENCODERS)))
        _ENCODERS[id(be)] = (be, fp, fe)
    return fe


def clear_caches(encoders: bool = True, chars: bool = True, disk: bool = False, cache_dir=None):
    """Forget built encoders, verified characters and (with `disk`) the compiled models on disk: for cold benchmarks."""
    with _LOCK:
        if encoders:
            _ENCODERS.clear()
        if chars:
            _CHAR_OK.clear()
    if disk:
        d = default_cache_dir() if cache_dir is None else Path(cache_dir)
        for p in d.glob("*.npz") if d.exists() else ():
            with contextlib.suppress(OSError):
                p.unlink()
