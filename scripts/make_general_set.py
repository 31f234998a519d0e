#!/usr/bin/env python3
"""Write the built-in general-knowledge set, src/dstune/data/general/general.jsonl.

The set is used for general replay (mixed into domain fine-tuning) and as the tier-1
"general capability kept" evaluation. Every fact below is a hand-written table by the
dstune developers (no third-party dataset), licensed Apache-2.0 like dstune itself.

Answers are short (a word, a number or a short phrase, no trailing period) so exact
match can score them. The script is deterministic: no randomness, records in id order.

    python3 scripts/make_general_set.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "dstune" / "data" / "general" / "general.jsonl"

EN_NUM = " Answer with a number."
EN_WORD = " Answer with one word."
ZH_NUM = "只回答数字。"

# ---------------------------------------------------------------- arithmetic
# (a, op, b); the answer is computed and must be an exact non-negative integer.
ARITHMETIC_EN = [
    (3, "+", 5), (7, "+", 6), (12, "+", 9), (25, "+", 17), (48, "+", 36), (14, "+", 28), (9, "+", 9), (63, "+", 29),
    (10, "-", 4), (15, "-", 8), (30, "-", 12), (52, "-", 27), (100, "-", 45), (81, "-", 19), (70, "-", 35),
    (6, "×", 7), (8, "×", 9), (4, "×", 12), (11, "×", 11), (5, "×", 15), (3, "×", 13), (7, "×", 8),
    (56, "÷", 8), (81, "÷", 9), (144, "÷", 12), (72, "÷", 6), (100, "÷", 4), (63, "÷", 7), (90, "÷", 5), (48, "÷", 3),
]
ARITHMETIC_ZH = [
    (3, "+", 5), (4, "+", 6), (8, "+", 7), (16, "+", 25), (33, "+", 48), (50, "+", 50),
    (9, "-", 4), (20, "-", 7), (45, "-", 18), (64, "-", 32), (100, "-", 1), (37, "-", 29),
    (2, "×", 9), (6, "×", 8), (9, "×", 9), (12, "×", 5), (7, "×", 7), (3, "×", 14),
    (42, "÷", 7), (36, "÷", 4), (64, "÷", 8), (120, "÷", 10), (27, "÷", 3), (96, "÷", 12), (50, "÷", 2),
]
ZH_OPS = {"+": "加", "-": "减", "×": "乘", "÷": "除以"}


def _compute(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "×":
        return a * b
    if b == 0 or a % b:
        raise ValueError(f"{a} ÷ {b} is not an exact integer")
    return a // b


def arithmetic_en():
    for a, op, b in ARITHMETIC_EN:
        yield f"What is {a} {op} {b}?", str(_compute(a, op, b))


def arithmetic_zh():
    for a, op, b in ARITHMETIC_ZH:
        value = _compute(a, op, b)
        how = "几" if value <= 10 else "多少"
        yield f"{a}{ZH_OPS[op]}{b}等于{how}？", str(value)


# ---------------------------------------------------------------- capital
# Well-known, undisputed capitals only (no split or moving capitals, no accented names).
CAPITAL_EN = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("South Korea", "Seoul"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
]
CAPITAL_ZH = [
    ("法国", "巴黎"), ("德国", "柏林"), ("意大利", "罗马"), ("西班牙", "马德里"), ("英国", "伦敦"),
    ("日本", "东京"), ("中国", "北京"), ("韩国", "首尔"), ("俄罗斯", "莫斯科"), ("加拿大", "渥太华"),
    ("澳大利亚", "堪培拉"), ("新西兰", "惠灵顿"), ("希腊", "雅典"), ("土耳其", "安卡拉"), ("挪威", "奥斯陆"),
    ("瑞典", "斯德哥尔摩"), ("丹麦", "哥本哈根"), ("波兰", "华沙"), ("奥地利", "维也纳"), ("泰国", "曼谷"),
    ("越南", "河内"), ("葡萄牙", "里斯本"), ("古巴", "哈瓦那"), ("菲律宾", "马尼拉"), ("伊朗", "德黑兰"),
]


def capital_en():
    for country, city in CAPITAL_EN:
        yield f"What is the capital of {country}?", city


def capital_zh():
    for country, city in CAPITAL_ZH:
        yield f"{country}的首都是哪里？", city


# ---------------------------------------------------------------- unit
# (target unit, source quantity as written, number of source units, target units per source unit)
UNIT_EN = [
    ("centimetres", "3 metres", 3, 100),
    ("centimetres", "a metre", 1, 100),
    ("millimetres", "5 centimetres", 5, 10),
    ("millimetres", "2 metres", 2, 1000),
    ("metres", "4 kilometres", 4, 1000),
    ("grams", "5 kilograms", 5, 1000),
    ("kilograms", "2 tonnes", 2, 1000),
    ("millilitres", "2 litres", 2, 1000),
    ("millilitres", "a litre", 1, 1000),
    ("minutes", "3 hours", 3, 60),
    ("minutes", "an hour", 1, 60),
    ("seconds", "4 minutes", 4, 60),
    ("seconds", "an hour", 1, 3600),
    ("hours", "2 days", 2, 24),
    ("hours", "a week", 1, 168),
    ("days", "a week", 1, 7),
    ("days", "5 weeks", 5, 7),
    ("months", "a year", 1, 12),
    ("months", "3 years", 3, 12),
    ("years", "a decade", 1, 10),
    ("years", "a century", 1, 100),
    ("inches", "a foot", 1, 12),
    ("inches", "2 feet", 2, 12),
    ("feet", "4 yards", 4, 3),
    ("ounces", "a pound", 1, 16),
]
UNIT_ZH = [
    ("3米", "厘米", 3, 100),
    ("1米", "毫米", 1, 1000),
    ("5厘米", "毫米", 5, 10),
    ("6分米", "厘米", 6, 10),
    ("4千米", "米", 4, 1000),
    ("2千克", "克", 2, 1000),
    ("3吨", "千克", 3, 1000),
    ("2升", "毫升", 2, 1000),
    ("2小时", "分钟", 2, 60),
    ("1小时", "秒", 1, 3600),
    ("5分钟", "秒", 5, 60),
    ("3天", "小时", 3, 24),
    ("4个星期", "天", 4, 7),
    ("2年", "个月", 2, 12),
    ("1个世纪", "年", 1, 100),
    ("5元", "角", 5, 10),
    ("3元", "分", 3, 100),
    ("1公顷", "平方米", 1, 10000),
    ("1平方米", "平方厘米", 1, 10000),
    ("7角", "分", 7, 10),
]


def unit_en():
    for target, source, n, factor in UNIT_EN:
        yield f"How many {target} are in {source}?{EN_NUM}", str(n * factor)


def unit_zh():
    for source, target, n, factor in UNIT_ZH:
        yield f"{source}等于多少{target}？{ZH_NUM}", str(n * factor)


# ---------------------------------------------------------------- antonym
# Pairs with one clear, conventional opposite.
ANTONYM_EN = [
    ("hot", "cold"), ("up", "down"), ("left", "right"), ("day", "night"), ("black", "white"), ("yes", "no"),
    ("true", "false"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("north", "south"), ("east", "west"),
    ("top", "bottom"), ("early", "late"), ("fast", "slow"), ("heavy", "light"), ("wet", "dry"), ("full", "empty"),
    ("above", "below"), ("first", "last"), ("inside", "outside"), ("before", "after"), ("always", "never"),
    ("rich", "poor"), ("strong", "weak"),
]
ANTONYM_ZH = [
    ("大", "小"), ("上", "下"), ("左", "右"), ("前", "后"), ("冷", "热"), ("黑", "白"), ("多", "少"),
    ("长", "短"), ("快", "慢"), ("早", "晚"), ("买", "卖"), ("东", "西"), ("南", "北"), ("真", "假"),
    ("胖", "瘦"), ("远", "近"), ("轻", "重"), ("新", "旧"), ("成功", "失败"), ("宽", "窄"),
]


def antonym_en():
    for word, opposite in ANTONYM_EN:
        yield f"What is the opposite of '{word}'?{EN_WORD}", opposite


def antonym_zh():
    for word, opposite in ANTONYM_ZH:
        yield f"“{word}”的反义词是什么？只回答反义词。", opposite


# ---------------------------------------------------------------- plural (English only)
PLURAL_EN = [
    ("child", "children"), ("mouse", "mice"), ("man", "men"), ("woman", "women"), ("foot", "feet"),
    ("tooth", "teeth"), ("goose", "geese"), ("sheep", "sheep"), ("deer", "deer"), ("ox", "oxen"),
    ("leaf", "leaves"), ("knife", "knives"), ("wife", "wives"), ("wolf", "wolves"), ("half", "halves"),
    ("box", "boxes"), ("city", "cities"), ("baby", "babies"), ("bus", "buses"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("church", "churches"), ("story", "stories"), ("crisis", "crises"),
    ("phenomenon", "phenomena"),
]


def plural_en():
    for word, plural in PLURAL_EN:
        yield f"What is the plural of '{word}'?{EN_WORD}", plural


# ---------------------------------------------------------------- calendar (days and months ordering)
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December"]
ORDINALS_EN = {3: "third", 5: "fifth", 8: "eighth", 10: "tenth"}
DAY_BEFORE_EN = ["Monday", "Wednesday", "Friday", "Sunday"]
MONTH_AFTER_EN = ["January", "March", "May", "July", "September", "November", "December"]
MONTH_BEFORE_EN = ["January", "June", "October"]

DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六"]  # Sunday left out: 星期日 and 星期天 both fit
MONTHS_ZH = ["一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月"]
DAY_AFTER_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五"]
DAY_BEFORE_ZH = ["星期二", "星期四", "星期六"]
MONTH_AFTER_ZH = ["一月", "五月", "十一月", "十二月"]
MONTH_BEFORE_ZH = ["三月", "一月"]
ORDINALS_ZH = {3: "三"}


def calendar_en():
    for day in DAYS_EN:
        yield f"Which day comes after {day}?", DAYS_EN[(DAYS_EN.index(day) + 1) % 7]
    for day in DAY_BEFORE_EN:
        yield f"Which day comes before {day}?", DAYS_EN[(DAYS_EN.index(day) - 1) % 7]
    for month in MONTH_AFTER_EN:
        yield f"Which month comes after {month}?", MONTHS_EN[(MONTHS_EN.index(month) + 1) % 12]
    for month in MONTH_BEFORE_EN:
        yield f"Which month comes before {month}?", MONTHS_EN[(MONTHS_EN.index(month) - 1) % 12]
    for n, word in ORDINALS_EN.items():
        yield f"What is the {word} month of the year?", MONTHS_EN[n - 1]


def calendar_zh():
    for day in DAY_AFTER_ZH:
        yield f"{day}的后一天是星期几？", DAYS_ZH[DAYS_ZH.index(day) + 1]
    for day in DAY_BEFORE_ZH:
        yield f"{day}的前一天是星期几？", DAYS_ZH[DAYS_ZH.index(day) - 1]
    for month in MONTH_AFTER_ZH:
        yield f"{month}的下一个月是几月？", MONTHS_ZH[(MONTHS_ZH.index(month) + 1) % 12]
    for month in MONTH_BEFORE_ZH:
        yield f"{month}的上一个月是几月？", MONTHS_ZH[(MONTHS_ZH.index(month) - 1) % 12]
    for n, word in ORDINALS_ZH.items():
        yield f"一年中的第{word}个月是几月？", MONTHS_ZH[n - 1]


# ---------------------------------------------------------------- science
# Very common facts; a numeric answer gets the "answer with a number" hint.
SCIENCE_EN = [
    ("What is the chemical formula of water?", "H2O"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for silver?", "Ag"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is the chemical symbol for oxygen?", "O"),
    ("What is the chemical symbol for hydrogen?", "H"),
    ("What is the chemical symbol for carbon?", "C"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("How many planets are in the Solar System?", "8"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in the Solar System?", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("At sea level, at what temperature in degrees Celsius does water boil?", "100"),
    ("At sea level, at what temperature in degrees Celsius does water freeze?", "0"),
    ("Which gas do plants take in from the air for photosynthesis?", "carbon dioxide"),
    ("Which gas makes up most of Earth's atmosphere?", "nitrogen"),
    ("How many bones are in the adult human body?", "206"),
    ("How many chambers does the human heart have?", "4"),
    ("Which organ pumps blood around the human body? Answer with one word.", "heart"),
    ("What is the hardest natural substance? Answer with one word.", "diamond"),
    ("What force makes objects fall to the ground? Answer with one word.", "gravity"),
    ("What is the atomic number of hydrogen?", "1"),
    ("What is the atomic number of carbon?", "6"),
    ("What is the atomic number of oxygen?", "8"),
    ("How many natural moons does Earth have?", "1"),
    ("How many degrees are in a right angle?", "90"),
    ("What sweet food do bees make from nectar? Answer with one word.", "honey"),
    ("What is the largest mammal on Earth?", "blue whale"),
]
SCIENCE_ZH = [
    ("水的化学式是什么？", "H2O"),
    ("金的元素符号是什么？", "Au"),
    ("银的元素符号是什么？", "Ag"),
    ("铁的元素符号是什么？", "Fe"),
    ("铜的元素符号是什么？", "Cu"),
    ("氧的元素符号是什么？", "O"),
    ("蜘蛛有几条腿？", "8"),
    ("昆虫有几条腿？", "6"),
    ("太阳系有几颗行星？", "8"),
    ("哪颗行星被称为“红色星球”？", "火星"),
    ("太阳系中最大的行星是哪颗？", "木星"),
    ("离太阳最近的行星是哪颗？", "水星"),
    ("在标准大气压下，水的沸点是多少摄氏度？", "100"),
    ("在标准大气压下，水的凝固点是多少摄氏度？", "0"),
    ("植物进行光合作用时从空气中吸收哪种气体？", "二氧化碳"),
    ("地球大气中含量最多的气体是什么？", "氮气"),
    ("成年人体内一共有多少块骨头？", "206"),
    ("人的心脏有几个腔？", "4"),
    ("人体最大的器官是什么？", "皮肤"),
    ("地球有几颗天然卫星？", "1"),
    ("氢的原子序数是多少？", "1"),
    ("碳的原子序数是多少？", "6"),
    ("一个直角是多少度？", "90"),
    ("三角形有几条边？", "3"),
    ("蜜蜂用花蜜酿造的食物是什么？", "蜂蜜"),
]


def science_en():
    for question, answer in SCIENCE_EN:
        yield (question + EN_NUM if answer.isdigit() else question), answer


def science_zh():
    for question, answer in SCIENCE_ZH:
        yield (question + ZH_NUM if answer.isdigit() else question), answer


# ---------------------------------------------------------------- translation
# Single common words with one standard translation.
TRANSLATION_EN = [  # English -> Chinese
    ("apple", "苹果"), ("banana", "香蕉"), ("cat", "猫"), ("dog", "狗"), ("fish", "鱼"), ("bird", "鸟"),
    ("horse", "马"), ("tree", "树"), ("water", "水"), ("sun", "太阳"), ("moon", "月亮"), ("milk", "牛奶"),
    ("bread", "面包"), ("tea", "茶"), ("coffee", "咖啡"), ("elephant", "大象"), ("tiger", "老虎"),
    ("panda", "熊猫"), ("library", "图书馆"), ("hospital", "医院"), ("airport", "机场"), ("bicycle", "自行车"),
    ("piano", "钢琴"), ("snow", "雪"), ("rain", "雨"),
]
TRANSLATION_ZH = [  # Chinese -> English
    ("书", "book"), ("学校", "school"), ("医生", "doctor"), ("眼睛", "eye"), ("手", "hand"), ("鸡蛋", "egg"),
    ("兔子", "rabbit"), ("猴子", "monkey"), ("花", "flower"), ("山", "mountain"), ("星星", "star"),
    ("银行", "bank"), ("雨伞", "umbrella"), ("钥匙", "key"), ("椅子", "chair"), ("窗户", "window"),
    ("门", "door"), ("狮子", "lion"), ("蛇", "snake"), ("蝴蝶", "butterfly"),
]


def translation_en():
    for word, chinese in TRANSLATION_EN:
        yield f"Translate '{word}' into Chinese. Answer with the Chinese word only.", chinese


def translation_zh():
    for word, english in TRANSLATION_ZH:
        yield f"把“{word}”翻译成英文，只回答英文单词。", english


# ---------------------------------------------------------------- spelling
FIRST_LETTER_EN = ["banana", "orange", "elephant", "guitar", "umbrella", "zebra", "kitchen"]
LAST_LETTER_EN = ["river", "window", "pencil", "garden", "rabbit", "family"]
LENGTH_EN = ["apple", "school", "computer", "water", "mountain", "sun"]
LETTER_COUNT_EN = [("a", "banana"), ("s", "Mississippi"), ("e", "elephant"), ("o", "tomorrow"), ("p", "pepper"),
                   ("l", "balloon")]

LENGTH_ZH = ["图书馆", "电脑", "中华人民共和国", "自行车", "太阳"]
NTH_CHAR_ZH = [("春夏秋冬", 2), ("东南西北", 3), ("一心一意", 4), ("风和日丽", 3), ("你好", 1)]
ZH_ORDINALS = {1: "一", 2: "二", 3: "三", 4: "四"}


def spelling_en():
    for word in FIRST_LETTER_EN:
        yield f"What is the first letter of the word '{word}'?", word[0]
    for word in LAST_LETTER_EN:
        yield f"What is the last letter of the word '{word}'?", word[-1]
    for word in LENGTH_EN:
        yield f"How many letters are in the word '{word}'?{EN_NUM}", str(len(word))
    for letter, word in LETTER_COUNT_EN:
        yield f"How many times does the letter '{letter}' appear in '{word}'?{EN_NUM}", str(word.lower().count(letter))


def spelling_zh():
    for word in LENGTH_ZH:
        yield f"“{word}”这个词有几个字？{ZH_NUM}", str(len(word))
    for word, n in NTH_CHAR_ZH:
        yield f"“{word}”的第{ZH_ORDINALS[n]}个字是什么？", word[n - 1]


# ---------------------------------------------------------------- assembly
GENERATORS = {
    "en": {
        "arithmetic": arithmetic_en, "capital": capital_en, "unit": unit_en, "antonym": antonym_en,
        "plural": plural_en, "calendar": calendar_en, "science": science_en, "translation": translation_en,
        "spelling": spelling_en,
    },
    "zh": {
        "arithmetic": arithmetic_zh, "capital": capital_zh, "unit": unit_zh, "antonym": antonym_zh,
        "calendar": calendar_zh, "science": science_zh, "translation": translation_zh, "spelling": spelling_zh,
    },
}


def build() -> list[dict]:
    records, seen = [], set()
    for lang, categories in GENERATORS.items():
        for category, generate in categories.items():
            for i, (question, answer) in enumerate(generate(), start=1):
                if question in seen:
                    raise ValueError(f"duplicate question: {question}")
                if not answer.strip() or answer != answer.strip() or answer.endswith("."):
                    raise ValueError(f"bad answer {answer!r} for {question}")
                seen.add(question)
                records.append({
                    "id": f"general-{lang}-{category}-{i:03d}",
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "meta": {"task": "general", "category": category, "lang": lang},
                })
    records.sort(key=lambda r: r["id"])
    if len({r["id"] for r in records}) != len(records):
        raise ValueError("duplicate ids")
    return records


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) for record in build()]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    print(f"wrote {len(lines)} records to {OUT}")


if __name__ == "__main__":
    main()
