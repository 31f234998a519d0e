#!/usr/bin/env python3
"""Write the built-in general-knowledge data, src/dstune/data/general/: a replay part and a held-out tier-1 part.

general.jsonl and general_text.txt are the replay / anchor part: general replay (mixed into domain fine-tuning) and
the KL anchor read them. general_test.jsonl and general_test_text.txt are the held-out part that the tier-1 "general
capability kept" evaluation reads, so that a model cannot pass the gate by learning the test. The two parts share
no id, no question and no paragraph (compared after NFKC, casefold and collapsed whitespace), and no looked-up fact
(country, word pair, arithmetic problem). Every fact and paragraph below was written by the dstune developers (no
third-party dataset), licensed Apache-2.0 like dstune itself.

Answers are short (a word, a number or a short phrase, no trailing period) so exact match can score them. The script
is deterministic: no randomness, records in id order, so a rerun writes byte-identical files.

    python3 scripts/make_general_set.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import unicodedata
from functools import partial
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "dstune" / "data" / "general"

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


def arithmetic_en(table=None):
    for a, op, b in table or ARITHMETIC_EN:
        yield f"What is {a} {op} {b}?", str(_compute(a, op, b))


def arithmetic_zh(table=None):
    for a, op, b in table or ARITHMETIC_ZH:
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


def capital_en(table=None):
    for country, city in table or CAPITAL_EN:
        yield f"What is the capital of {country}?", city


def capital_zh(table=None):
    for country, city in table or CAPITAL_ZH:
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


def antonym_en(table=None):
    for word, opposite in table or ANTONYM_EN:
        yield f"What is the opposite of '{word}'?{EN_WORD}", opposite


def antonym_zh(table=None):
    for word, opposite in table or ANTONYM_ZH:
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


def plural_en(table=None):
    for word, plural in table or PLURAL_EN:
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


def science_en(table=None):
    for question, answer in table or SCIENCE_EN:
        yield (question + EN_NUM if answer.isdigit() else question), answer


def science_zh(table=None):
    for question, answer in table or SCIENCE_ZH:
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


def translation_en(table=None):
    for word, chinese in table or TRANSLATION_EN:
        yield f"Translate '{word}' into Chinese. Answer with the Chinese word only.", chinese


def translation_zh(table=None):
    for word, english in table or TRANSLATION_ZH:
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



# ---------------------------------------------------------------- anchor prose (replay part)
ANCHOR_TEXT = (
    'Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water boils at a lower temperature, and food takes longer to cook. This is why climbers on high mountains use pressure cookers.',
    'The Earth turns once on its axis every day and travels around the Sun once every year. The tilt of its axis gives us the seasons: when the northern half leans towards the Sun, it is summer in the north and winter in the south.',
    "A library lends books, magazines and films to the people who live nearby. Most libraries also offer quiet rooms for study, free internet access and reading groups for children. Many people borrow electronic books from their library's website.",
    'Bread is made from flour, water, salt and yeast. The yeast eats the sugars in the dough and releases gas, which makes the dough rise. Baking sets the structure, and the crust turns brown as sugars and proteins react in the heat.',
    'Trains, buses and bicycles help cities cut traffic and air pollution. A city that plans safe cycle lanes and frequent buses gives its people more ways to travel, and fewer of them need a car for every trip.',
    'Plants take in carbon dioxide and water and, using the energy of sunlight, turn them into sugar and oxygen. This process is called photosynthesis. Almost all life on Earth depends on it, directly or indirectly.',
    "A good night's sleep helps memory, mood and health. Adults usually need seven to nine hours. Keeping a regular bedtime, avoiding screens late at night and keeping the bedroom dark and cool all make it easier to fall asleep.",
    '春天来了，公园里的花都开了。人们在周末带着孩子去散步、放风筝，老人们在树下下棋聊天。天气暖和以后，湖边跑步的人也多了起来。',
    '中国有很多传统节日。春节是一年中最重要的节日，家人会团聚在一起吃年夜饭。中秋节的时候，人们一边赏月，一边吃月饼。',
    '学习一门外语需要耐心。每天读一点、听一点、说一点，比考试前突击更有效。和说这门语言的人交流，可以很快提高口语水平。',
    '城市里的地铁又快又方便，每天有成千上万的人乘坐地铁上班上学。高峰时间车厢很挤，所以很多人选择提前出门，或者骑共享单车。',
    '多喝水、多吃蔬菜水果、每天适量运动，是保持健康的好习惯。运动不一定要很剧烈，快走、游泳和骑车都是不错的选择。',
)


# ================================================================ the held-out tier-1 part
# New facts only: no country, word pair or arithmetic problem of the replay part (checked in `check_disjoint`).

# ---------------------------------------------------------------- arithmetic, computed from fixed steps
def _problems(count: int, seed: int, taken: set) -> list[tuple[int, str, int]]:
    """`count` distinct problems, the four operations in turn, numbers from fixed steps (no randomness)."""
    out, k = [], 0
    while len(out) < count:
        op = "+-×÷"[k % 4]
        j = k // 4 + seed
        if op == "+":
            a, b = 12 + (7 * j) % 85, 5 + (13 * j) % 70
        elif op == "-":
            a = 40 + (11 * j) % 150
            b = 3 + (17 * j) % (a - 3)
        elif op == "×":
            a, b = 2 + (5 * j) % 18, 3 + (7 * j) % 11
        else:
            b = 2 + (3 * j) % 11
            a = b * (3 + (7 * j) % 17)
        if (a, op, b) not in taken:
            taken.add((a, op, b))
            out.append((a, op, b))
        k += 1
    return out


_TAKEN = set(ARITHMETIC_EN) | set(ARITHMETIC_ZH)
HELDOUT_ARITHMETIC_EN = _problems(90, 0, _TAKEN)
HELDOUT_ARITHMETIC_ZH = _problems(70, 40, _TAKEN)


# ---------------------------------------------------------------- unit, each conversion at quantities the replay part never asks
# (target unit, source unit in the plural, target units per source unit)
HELDOUT_UNIT_EN = [
    ("centimetres", "metres", 100), ("millimetres", "centimetres", 10), ("metres", "kilometres", 1000),
    ("grams", "kilograms", 1000), ("millilitres", "litres", 1000), ("minutes", "hours", 60),
    ("seconds", "minutes", 60), ("hours", "days", 24), ("days", "weeks", 7), ("months", "years", 12),
    ("years", "decades", 10), ("inches", "feet", 12), ("feet", "yards", 3), ("ounces", "pounds", 16),
    ("years", "centuries", 100),
]
HELDOUT_UNIT_ZH = [
    ("米", "厘米", 100), ("厘米", "毫米", 10), ("千米", "米", 1000), ("千克", "克", 1000), ("吨", "千克", 1000),
    ("升", "毫升", 1000), ("小时", "分钟", 60), ("分钟", "秒", 60), ("天", "小时", 24), ("个星期", "天", 7),
    ("年", "个月", 12), ("个世纪", "年", 100), ("元", "角", 10), ("角", "分", 10), ("分米", "厘米", 10),
]


def heldout_unit_en():
    for n in (6, 7, 9):
        for target, source, factor in HELDOUT_UNIT_EN:
            yield f"How many {target} are in {n} {source}?{EN_NUM}", str(n * factor)


def heldout_unit_zh():
    for n in (8, 9):
        for source, target, factor in HELDOUT_UNIT_ZH:
            yield f"{n}{source}等于多少{target}？{ZH_NUM}", str(n * factor)


# ---------------------------------------------------------------- calendar
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # February (28 or 29) is never asked
ORDINAL_WORDS_EN = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                    "eleventh", "twelfth"]
ZH_NUMBERS = ["一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二"]


def heldout_calendar_en():
    for day in DAYS_EN:
        if day not in DAY_BEFORE_EN:
            yield f"Which day comes before {day}?", DAYS_EN[(DAYS_EN.index(day) - 1) % 7]
    for month in MONTHS_EN[:11]:
        if month not in MONTH_AFTER_EN:
            yield f"Which month comes after {month}?", MONTHS_EN[MONTHS_EN.index(month) + 1]
    for month in MONTHS_EN[1:]:
        if month not in MONTH_BEFORE_EN:
            yield f"Which month comes before {month}?", MONTHS_EN[MONTHS_EN.index(month) - 1]
    for n, word in enumerate(ORDINAL_WORDS_EN, start=1):
        if n not in ORDINALS_EN:
            yield f"What is the {word} month of the year?", MONTHS_EN[n - 1]
    for month, days in zip(MONTHS_EN, MONTH_DAYS):
        if month != "February":
            yield f"How many days are there in {month}?{EN_NUM}", str(days)
    for i in range(10):
        day, n = DAYS_EN[(3 * i) % 7], 2 + i % 5
        yield f"If today is {day}, what day of the week will it be in {n} days?", DAYS_EN[(DAYS_EN.index(day) + n) % 7]


def heldout_calendar_zh():
    for day in ("星期三", "星期五"):
        yield f"{day}的前一天是星期几？", DAYS_ZH[DAYS_ZH.index(day) - 1]
    for month in MONTHS_ZH[:11]:
        if month not in MONTH_AFTER_ZH:
            yield f"{month}的下一个月是几月？", MONTHS_ZH[MONTHS_ZH.index(month) + 1]
    for month in MONTHS_ZH[1:]:
        if month not in MONTH_BEFORE_ZH:
            yield f"{month}的上一个月是几月？", MONTHS_ZH[MONTHS_ZH.index(month) - 1]
    for n, word in enumerate(ZH_NUMBERS, start=1):
        if word not in ORDINALS_ZH.values():
            yield f"一年中的第{word}个月是几月？", MONTHS_ZH[n - 1]
    for month, days in zip(MONTHS_ZH, MONTH_DAYS):
        if month != "二月":
            yield f"{month}有多少天？{ZH_NUM}", str(days)
    for i in range(12):
        day, n = DAYS_ZH[(5 * i) % 6], 2 + i % 4
        later = (DAYS_ZH.index(day) + n) % 7
        if later < 6:  # Sunday left out, as above
            yield f"今天是{day}，{'两三四五'[n - 2]}天后是星期几？", DAYS_ZH[later]


# ---------------------------------------------------------------- spelling
HELDOUT_FIRST_LETTER_EN = ["pumpkin", "lemon", "violin", "yellow", "island", "quiet", "jacket", "dolphin", "needle",
                        "harbour"]
HELDOUT_LAST_LETTER_EN = ["carrot", "pillow", "candle", "basket", "rainbow", "forest", "spoon", "cactus", "diary",
                       "meadow"]
HELDOUT_LENGTH_EN = ["cloud", "planet", "teacher", "bridge", "calendar", "ocean", "telephone", "kite", "lantern",
                  "butterfly", "gold", "history"]
HELDOUT_LETTER_COUNT_EN = [("r", "strawberry"), ("e", "excellent"), ("s", "possess"), ("t", "attention"),
                        ("i", "initial"), ("l", "parallel"), ("c", "occurrence"), ("m", "committee"),
                        ("b", "bubble"), ("g", "giggle"), ("d", "middle"), ("p", "hippopotamus")]
HELDOUT_LENGTH_ZH = ["飞机场", "长颈鹿", "太平洋", "图书", "中国", "北京大学", "电视机", "五角星", "火车站", "西红柿"]
HELDOUT_NTH_CHAR_ZH = [("一石二鸟", 3), ("画蛇添足", 2), ("守株待兔", 4), ("对牛弹琴", 2), ("亡羊补牢", 2),
                    ("井底之蛙", 4), ("三心二意", 1), ("山清水秀", 3), ("鸟语花香", 3), ("马到成功", 1),
                    ("春暖花开", 2), ("百发百中", 4)]
HELDOUT_LAST_CHAR_ZH = ["铅笔", "大海", "月饼", "熊猫", "森林", "眼镜", "公园", "桌子"]


def heldout_spelling_en():
    for word in HELDOUT_FIRST_LETTER_EN:
        yield f"What is the first letter of the word '{word}'?", word[0]
    for word in HELDOUT_LAST_LETTER_EN:
        yield f"What is the last letter of the word '{word}'?", word[-1]
    for word in HELDOUT_LENGTH_EN:
        yield f"How many letters are in the word '{word}'?{EN_NUM}", str(len(word))
    for letter, word in HELDOUT_LETTER_COUNT_EN:
        yield f"How many times does the letter '{letter}' appear in '{word}'?{EN_NUM}", str(word.count(letter))


def heldout_spelling_zh():
    for word in HELDOUT_LENGTH_ZH:
        yield f"“{word}”这个词有几个字？{ZH_NUM}", str(len(word))
    for word, n in HELDOUT_NTH_CHAR_ZH:
        yield f"“{word}”的第{ZH_NUMBERS[n - 1]}个字是什么？", word[n - 1]
    for word in HELDOUT_LAST_CHAR_ZH:
        yield f"“{word}”的最后一个字是什么？", word[-1]


# ---------------------------------------------------------------- capital
HELDOUT_CAPITAL_EN = [
    ("Egypt", "Cairo"), ("Chile", "Santiago"), ("Saudi Arabia", "Riyadh"), ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Jamaica", "Kingston"),
    ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Cambodia", "Phnom Penh"),
    ("Laos", "Vientiane"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"), ("Ecuador", "Quito"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Qatar", "Doha"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
    ("Senegal", "Dakar"),
]
HELDOUT_CAPITAL_ZH = [
    ("埃及", "开罗"), ("智利", "圣地亚哥"), ("沙特阿拉伯", "利雅得"), ("尼日利亚", "阿布贾"), ("巴基斯坦", "伊斯兰堡"),
    ("阿富汗", "喀布尔"), ("尼泊尔", "加德满都"), ("柬埔寨", "金边"), ("老挝", "万象"), ("罗马尼亚", "布加勒斯特"),
    ("保加利亚", "索非亚"), ("塞尔维亚", "贝尔格莱德"), ("委内瑞拉", "加拉加斯"), ("乌拉圭", "蒙得维的亚"),
    ("叙利亚", "大马士革"), ("黎巴嫩", "贝鲁特"), ("约旦", "安曼"), ("卡塔尔", "多哈"), ("伊拉克", "巴格达"),
    ("比利时", "布鲁塞尔"), ("捷克", "布拉格"), ("朝鲜", "平壤"), ("孟加拉国", "达卡"), ("赞比亚", "卢萨卡"),
    ("津巴布韦", "哈拉雷"),
]


# ---------------------------------------------------------------- antonym
HELDOUT_ANTONYM_EN = [
    ("happy", "sad"), ("young", "old"), ("tall", "short"), ("thick", "thin"), ("hard", "soft"), ("high", "low"),
    ("near", "far"), ("clean", "dirty"), ("cheap", "expensive"), ("safe", "dangerous"), ("asleep", "awake"),
    ("entrance", "exit"), ("maximum", "minimum"), ("increase", "decrease"), ("import", "export"),
    ("positive", "negative"), ("possible", "impossible"), ("remember", "forget"), ("friend", "enemy"),
    ("wide", "narrow"), ("deep", "shallow"), ("smooth", "rough"), ("alive", "dead"), ("love", "hate"),
    ("sunrise", "sunset"),
]
HELDOUT_ANTONYM_ZH = [
    ("美", "丑"), ("甜", "苦"), ("深", "浅"), ("厚", "薄"), ("粗", "细"), ("硬", "软"), ("正", "反"), ("好", "坏"),
    ("哭", "笑"), ("忙", "闲"), ("开始", "结束"), ("进口", "出口"), ("增加", "减少"), ("安全", "危险"),
    ("简单", "复杂"), ("干净", "脏"), ("香", "臭"), ("饱", "饿"), ("勤劳", "懒惰"), ("熟悉", "陌生"),
]


# ---------------------------------------------------------------- plural (English only)
HELDOUT_PLURAL_EN = [
    ("louse", "lice"), ("analysis", "analyses"), ("thesis", "theses"), ("criterion", "criteria"), ("calf", "calves"),
    ("loaf", "loaves"), ("shelf", "shelves"), ("thief", "thieves"), ("life", "lives"), ("hero", "heroes"),
    ("echo", "echoes"), ("lady", "ladies"), ("party", "parties"), ("fox", "foxes"), ("watch", "watches"),
    ("glass", "glasses"), ("dish", "dishes"), ("key", "keys"), ("toy", "toys"), ("moose", "moose"),
    ("series", "series"), ("species", "species"), ("aircraft", "aircraft"), ("cherry", "cherries"),
    ("bench", "benches"),
]


# ---------------------------------------------------------------- science
HELDOUT_SCIENCE_EN = [
    ("What is the chemical symbol for potassium?", "K"),
    ("What is the chemical symbol for calcium?", "Ca"),
    ("What is the chemical symbol for nitrogen?", "N"),
    ("What is the chemical symbol for helium?", "He"),
    ("What is the chemical symbol for zinc?", "Zn"),
    ("What is the chemical symbol for lead?", "Pb"),
    ("What is the chemical symbol for tin?", "Sn"),
    ("What is the chemical symbol for chlorine?", "Cl"),
    ("What is the chemical symbol for neon?", "Ne"),
    ("What is the chemical symbol for sulfur?", "S"),
    ("Which planet is farthest from the Sun?", "Neptune"),
    ("Which planet is best known for its bright rings?", "Saturn"),
    ("On which planet do people live?", "Earth"),
    ("How many sides does a hexagon have?", "6"),
    ("How many sides does a pentagon have?", "5"),
    ("How many sides does an octagon have?", "8"),
    ("How many degrees are in a full circle?", "360"),
    ("How many degrees do the angles of a triangle add up to?", "180"),
    ("What is the largest ocean on Earth? Answer with one word.", "Pacific"),
    ("What is the name of the highest mountain above sea level? Answer with one word.", "Everest"),
    ("What is the fastest land animal?", "cheetah"),
    ("What is the tallest animal?", "giraffe"),
    ("What is the largest land animal?", "elephant"),
    ("Which gas do humans need to breathe in to stay alive?", "oxygen"),
    ("How many teeth does an adult human usually have?", "32"),
    ("Which organs do humans breathe with? Answer with one word.", "lungs"),
    ("What is the longest bone in the human body? Answer with one word.", "femur"),
    ("What colour do you get when you mix blue and yellow paint? Answer with one word.", "green"),
    ("What is the smallest prime number?", "2"),
    ("How many days does Earth take to go around the Sun, to the nearest whole day?", "365"),
    ("What is frozen water called? Answer with one word.", "ice"),
    ("At sea level, at what temperature in degrees Fahrenheit does water freeze?", "32"),
]
HELDOUT_SCIENCE_ZH = [
    ("钾的元素符号是什么？", "K"),
    ("钙的元素符号是什么？", "Ca"),
    ("氮的元素符号是什么？", "N"),
    ("氦的元素符号是什么？", "He"),
    ("锌的元素符号是什么？", "Zn"),
    ("硫的元素符号是什么？", "S"),
    ("氯的元素符号是什么？", "Cl"),
    ("铅的元素符号是什么？", "Pb"),
    ("锡的元素符号是什么？", "Sn"),
    ("氖的元素符号是什么？", "Ne"),
    ("太阳系中离太阳最远的行星是哪颗？", "海王星"),
    ("以明亮的光环著称的行星是哪颗？", "土星"),
    ("人类居住的行星叫什么？", "地球"),
    ("六边形有几条边？", "6"),
    ("五边形有几条边？", "5"),
    ("八边形有几条边？", "8"),
    ("一个周角是多少度？", "360"),
    ("三角形的内角和是多少度？", "180"),
    ("世界上最大的大洋是哪个？", "太平洋"),
    ("世界上海拔最高的山峰是哪座？", "珠穆朗玛峰"),
    ("陆地上跑得最快的动物是什么？", "猎豹"),
    ("世界上最高的动物是什么？", "长颈鹿"),
    ("成年人通常有多少颗牙齿？", "32"),
    ("人用什么器官呼吸？", "肺"),
    ("蓝色和黄色的颜料混合后是什么颜色？", "绿色"),
    ("最小的质数是几？", "2"),
]


# ---------------------------------------------------------------- translation
HELDOUT_TRANSLATION_EN = [  # English -> Chinese
    ("table", "桌子"), ("telephone", "电话"), ("student", "学生"), ("sky", "天空"), ("cloud", "云"), ("wind", "风"),
    ("fire", "火"), ("grass", "草"), ("pig", "猪"), ("chicken", "鸡"), ("duck", "鸭"), ("ear", "耳朵"),
    ("nose", "鼻子"), ("bed", "床"), ("ship", "船"), ("train", "火车"), ("bridge", "桥"), ("music", "音乐"),
    ("friend", "朋友"), ("river", "河"), ("watermelon", "西瓜"), ("grape", "葡萄"), ("strawberry", "草莓"),
    ("cow", "牛"), ("shoe", "鞋"),
]
HELDOUT_TRANSLATION_ZH = [  # Chinese -> English
    ("盐", "salt"), ("糖", "sugar"), ("厨房", "kitchen"), ("报纸", "newspaper"), ("森林", "forest"), ("沙漠", "desert"),
    ("岛", "island"), ("头发", "hair"), ("腿", "leg"), ("熊", "bear"), ("蛋糕", "cake"), ("手表", "watch"),
    ("镜子", "mirror"), ("城市", "city"), ("村庄", "village"), ("铅笔", "pencil"), ("牙刷", "toothbrush"),
    ("公园", "park"), ("时间", "time"), ("海", "sea"),
]


# ---------------------------------------------------------------- held-out prose, for tier-1 perplexity
HELDOUT_TEXT = (
    "The water cycle moves water between the sea, the air and the land. The Sun warms the surface of oceans and lakes, and some of the water evaporates into invisible vapour. As the moist air rises it cools, and the vapour condenses into tiny droplets that form clouds. When the droplets join and grow heavy enough, they fall as rain or snow. Rivers and underground water carry much of it back to the sea, where the cycle begins again. The same water has been moving in this way for billions of years.",
    "The Moon does not make its own light; it reflects light from the Sun. As it travels around the Earth, about once every twenty-nine and a half days, we see different parts of its sunlit half. At new moon the lit side faces away from us and the Moon is almost invisible. Over the following two weeks it grows through a crescent and a half moon to a full moon, and then it shrinks again. The Moon always shows nearly the same face to the Earth, because it turns once on its axis in the time it takes to go around us.",
    "Tides are the regular rise and fall of the sea along the coast. They are caused mainly by the pull of the Moon's gravity, with a smaller pull from the Sun. Most coasts have two high tides and two low tides roughly every day. When the Sun, the Moon and the Earth line up, at new and full moon, the tides are stronger than usual; these are called spring tides, although they have nothing to do with the season. Fishermen, sailors and people who walk on beaches check tide tables so that they are not caught by the rising water.",
    "A volcano is an opening in the Earth's crust through which melted rock, gas and ash escape. Below the surface the melted rock is called magma; once it flows out it is called lava. Many volcanoes lie along the edges of the large plates that make up the Earth's outer shell, for example around the Pacific Ocean. Some erupt quietly, with rivers of lava, while others explode and throw ash high into the sky. Volcanic soil is often very fertile, which is one reason why farmers have lived near volcanoes for thousands of years despite the danger.",
    "Honeybees live in colonies that can hold tens of thousands of insects. A single queen lays the eggs, while worker bees collect nectar and pollen, look after the young, clean the hive and guard the entrance. As a bee moves from flower to flower, pollen sticks to its hairy body and is carried to the next plant, which helps the plant make seeds and fruit. Many crops, such as apples, almonds and cucumbers, depend on this help. Back in the hive, the bees turn nectar into honey and store it in wax cells for the winter.",
    "Before printing, books were copied by hand, which made them rare and expensive. In the fifteenth century Johannes Gutenberg, working in Germany, built a printing press that used movable metal type. Each letter was a small separate piece that could be arranged into lines, inked and pressed onto paper, then reused for the next page. Printed books became cheaper and more common, and ideas spread more quickly across Europe. Long before that, printers in China and Korea had used carved wooden blocks and movable type made of clay and metal.",
    "A map is a small picture of a large area, so every map has a scale. A scale of one to fifty thousand means that one centimetre on the map stands for fifty thousand centimetres, or half a kilometre, on the ground. Maps also use symbols: blue lines for rivers, green areas for forests and small squares or other marks for buildings. Contour lines join points of the same height; where they are close together the ground is steep. Most maps are drawn with north at the top, and a small arrow or compass rose shows the direction.",
    "Composting turns kitchen and garden waste into a dark, crumbly material that feeds the soil. Fruit and vegetable peelings, coffee grounds, leaves and grass cuttings can all go on a compost heap. Bacteria, fungi and small animals such as worms break the waste down, and the heap becomes warm as they work. A good heap needs air and a little moisture, so gardeners turn it now and then and keep it neither too dry nor too wet. After a few months the compost can be spread on flower beds and vegetable plots.",
    "A rainbow appears when sunlight shines through drops of rain. Each drop bends the light as it enters, reflects it from the back and bends it again as it leaves. White sunlight is a mixture of colours, and each colour is bent by a slightly different amount, so the light spreads out into a band. That is why the colours always appear in the same order, from red on the outside to violet on the inside. To see a rainbow you must stand with the Sun behind you, which is why rainbows are often seen in the early morning or late afternoon.",
    "The heart is a muscle about the size of a fist. It beats around sixty to one hundred times a minute when a person is at rest, and it never stops during a lifetime. The right side of the heart sends blood to the lungs, where the blood picks up oxygen and releases carbon dioxide. The left side then pumps this fresh blood through the arteries to the rest of the body, and veins carry it back to the heart. Regular exercise, a balanced diet and not smoking all help to keep the heart healthy.",
    "Aluminium cans are among the easiest things to recycle. The metal can be melted down and made into new cans again and again without losing its quality. Recycling aluminium uses only a small part of the energy needed to make new metal from ore, so it saves both energy and natural resources. Glass and paper can be recycled too, although paper fibres become shorter each time and can only be reused a limited number of times. Sorting waste at home, and rinsing containers before putting them in the bin, makes recycling work better.",
    "Wind turbines turn the energy of moving air into electricity. The wind pushes on the long blades and makes them turn a shaft, which drives a generator inside the housing at the top of the tower. Bigger blades and taller towers catch more wind, because the wind is usually stronger and steadier higher above the ground. Many turbines are built at sea, where the wind blows more evenly. Wind power produces no smoke while it runs, but the wind does not always blow, so power grids also need other sources or ways to store energy.",
    "The metric system measures length in metres, mass in grams and volume in litres. Its units grow and shrink in steps of ten, so converting between them only means moving the decimal point. A kilometre is a thousand metres, a centimetre is a hundredth of a metre and a millimetre is a thousandth. The system was first introduced in France at the end of the eighteenth century, and today almost every country uses it in science and daily life. A few countries still use older units, such as miles, pounds and gallons, alongside it.",
    "Soap cleans because its molecules have two different ends. One end is attracted to water, and the other end is attracted to oil and grease. When you wash your hands, the oily ends stick to the dirt and grease on your skin while the other ends face the water. The grease is broken into tiny droplets surrounded by soap, and these droplets are rinsed away. This is why water alone cannot remove an oily stain but soapy water can. Washing hands with soap for about twenty seconds also removes many germs.",
    "Every autumn many birds fly thousands of kilometres from their summer breeding grounds to warmer places where food is easier to find. In spring they make the journey back. Swallows, for example, travel between Europe and southern Africa. Birds find their way using the position of the Sun and the stars, the Earth's magnetic field and landmarks such as coastlines and mountains. Before they leave, they eat a lot and store fat, which gives them the energy for the long flight. Some small birds fly for many hours without stopping.",
    "A desert is a place that receives very little rain, usually less than twenty-five centimetres a year. Not all deserts are hot and sandy: some are rocky, and the largest deserts on Earth are the cold, icy lands around the poles. In hot deserts the days can be burning, but the nights are often cold, because dry air and clear skies let the heat escape quickly. Plants such as cacti store water in thick stems, and many animals stay in burrows during the day and come out to feed at night.",
    "Sound is a vibration that travels through air, water or solid objects. When a guitar string vibrates, it pushes the air around it and sends out waves of pressure. In air, sound travels at about three hundred and forty metres per second, far slower than light, which is why we see lightning before we hear thunder. Inside the ear, the waves make the eardrum vibrate, and tiny bones pass the movement to the inner ear. There, thousands of small hair cells turn it into signals that the brain understands as sound.",
    "A compass needle is a small magnet that can turn freely. The Earth itself behaves like a huge magnet, so the needle lines up with its magnetic field and points roughly north. Magnetic north is not exactly the same as the geographic North Pole, and the difference changes slowly over the years, so careful map readers correct for it. The magnetic compass was used for finding directions in China many centuries ago and later became an essential tool for sailors on long voyages across the open sea.",
    "A glacier is a large, slow-moving body of ice that forms where more snow falls each winter than melts each summer. Over many years the snow is pressed into thick, dense ice. Under its own weight the ice slowly flows downhill, often only a few centimetres or metres a day. As it moves, it scrapes the rock beneath it and carves deep U-shaped valleys. Glaciers store a large share of the world's fresh water. In many mountain ranges they are now shrinking as the climate warms, which affects the rivers that they feed.",
    "Teeth are covered by enamel, the hardest substance in the human body. Children have twenty milk teeth, which fall out and are replaced by adult teeth. Bacteria in the mouth feed on sugar and produce acids that can slowly dissolve enamel and cause holes. Brushing twice a day with fluoride toothpaste, cleaning between the teeth and eating fewer sugary snacks all help to prevent this. Dentists recommend regular check-ups, because small problems are much easier to treat when they are found early.",
    "A refrigerator keeps food cold by moving heat from the inside to the outside. A special fluid called a refrigerant flows through pipes. Inside the fridge it evaporates and takes in heat, cooling the air and the food. A pump called a compressor then squeezes the gas, which makes it hot, and the heat is given off through the coils at the back of the fridge. That is why the back of a fridge feels warm. Cold slows down the bacteria that make food go bad, so fresh food lasts longer.",
    "The ancient Olympic Games were held at Olympia, in Greece, for more than a thousand years. The modern Olympic Games began in Athens in 1896 and are now held every four years, with the Winter Games two years apart from the Summer Games. Athletes from more than two hundred countries and teams take part in sports such as running, swimming, gymnastics and cycling. The Olympic symbol is five linked rings, which stand for the meeting of the continents. Winners receive gold medals, and those who finish second and third receive silver and bronze.",
    "A seed holds a tiny young plant together with a store of food, wrapped in a protective coat. It can wait for months or even years until the conditions are right. When it has water, air and a suitable temperature, it swells and the coat splits. First a root grows downwards to take in water, and then a shoot grows upwards towards the light. Once the first leaves open, the young plant can make its own food from sunlight. Gardeners sow seeds at the right depth, because a seed buried too deep may use up its stored food before it reaches the surface.",
    "Chess is a game for two players on a board of sixty-four squares. Each player starts with sixteen pieces: a king, a queen, two rooks, two bishops, two knights and eight pawns. Every kind of piece moves in its own way; the knight, for example, jumps in the shape of the letter L. The aim is to checkmate the other player's king, which means attacking it so that it cannot escape. The game is thought to have begun in India about one and a half thousand years ago and spread through Persia to Europe.",
    "Lightning is a giant spark of electricity in the sky. Inside a storm cloud, ice crystals and water drops bump into each other, and electric charges build up, mostly positive near the top of the cloud and negative near the bottom. When the difference becomes large enough, electricity jumps between the cloud and the ground or between clouds. The flash heats the air so fast that it expands with a bang, which we hear as thunder. Counting the seconds between the flash and the thunder and dividing by three gives a rough distance in kilometres.",
    "A bicycle turns the push of a rider's legs into forward motion with very little waste. The pedals turn a toothed wheel called a chainring, and a chain carries the movement to a smaller toothed wheel on the back wheel. Gears change how far the bicycle travels for each turn of the pedals: low gears make climbing hills easier, and high gears allow more speed on flat roads. Air in the tyres cushions the ride. Cycling is one of the most energy-efficient ways for a person to travel.",
    "长城是中国古代修建的防御工程，东西绵延上万里。最早的城墙在两千多年前就开始修建，后来的许多朝代又不断加固和连接。今天人们看到的许多段落是明朝时修建的，用砖和石头砌成，沿着山脊起伏。长城上每隔一段距离就有烽火台，守卫发现敌人时会点燃烽火传递消息。现在，长城是世界文化遗产，每年吸引大量游客。",
    "大熊猫生活在中国西南部的山区，主要分布在四川、陕西和甘肃。它们几乎只吃竹子，每天要花十几个小时进食。大熊猫刚出生时非常小，体重只有一百克左右，需要母亲细心照顾。经过多年的保护工作，野生大熊猫的数量有所增加。它们黑白分明的样子很受人们喜爱，也常被看作中国的象征。",
    "茶起源于中国，已经有几千年的历史。茶叶来自茶树，采摘后经过不同的加工方法，可以制成绿茶、红茶、乌龙茶等不同种类。绿茶不经过发酵，保留了叶子的绿色；红茶经过充分发酵，泡出来的茶汤颜色较深。喝茶在中国是一种日常习惯，人们常用一杯热茶招待客人。后来，茶叶通过陆路和海路传到了世界各地。",
    "二十四节气是中国古人根据太阳在一年中的位置划分出来的，用来指导农业生产。每个节气大约相隔十五天，比如立春、春分、清明、夏至、秋分和冬至。夏至这一天，北半球白天最长；冬至这一天，北半球白天最短。很多地方至今还保留着与节气有关的习俗，例如冬至吃饺子或汤圆。2016年，二十四节气被列入联合国教科文组织的人类非物质文化遗产代表作名录。",
    "长江是中国最长的河流，全长约六千三百千米，是世界第三长河。它发源于青藏高原，自西向东流经多个省份，最后在上海附近注入东海。长江流域气候温和，雨水充足，自古以来就是重要的农业区，盛产水稻。长江上的三峡工程是世界上规模最大的水电站之一。沿江的重庆、武汉、南京等城市都是重要的交通和经济中心。",
    "汉字是世界上使用时间最长的文字之一。最早成体系的汉字是刻在龟甲和兽骨上的甲骨文，距今已有三千多年。汉字的结构多种多样，有的像事物的样子，有的一部分表示意思，另一部分表示读音。常用汉字有三千多个，认识这些字就能读懂大部分报纸和书籍。现在中国大陆使用简化字，而台湾、香港等地仍然使用繁体字。",
    "造纸术是中国古代的四大发明之一。东汉时期，蔡伦改进了造纸的方法，用树皮、麻头、破布和旧渔网等材料造出了便宜又好用的纸。在这以前，人们把字写在竹简、木片或丝绸上，竹简很重，丝绸又太贵。纸的出现让书写和传播知识变得容易多了。后来，造纸术经过中亚传到阿拉伯地区，再传到欧洲。",
    "很多城市开始实行垃圾分类。常见的做法是把生活垃圾分成可回收物、有害垃圾、厨余垃圾和其他垃圾四类。废纸、塑料瓶和金属罐属于可回收物，可以重新加工利用；废灯管和过期药品属于有害垃圾，需要专门处理。厨余垃圾可以用来制作肥料。做好垃圾分类，既能减少垃圾填埋和焚烧的数量，也能节约资源、保护环境。",
    "天气预报告诉我们未来几天的天气情况。气象部门通过地面观测站、气象气球、雷达和卫星收集温度、湿度、气压和风的数据，再用计算机模型计算大气的变化。一般来说，未来一两天的预报比较准确，预报的时间越长，误差就越大。人们根据天气预报决定是否带伞、穿什么衣服，农民和渔民也要依靠天气预报安排生产。",
    "京杭大运河是世界上最长的人工河流之一，北起北京，南到杭州，全长一千七百多千米。它最早的河段在春秋时期就已开凿，隋朝时大规模修建，把南北的河道连接起来。在铁路出现以前，大运河是把南方的粮食和货物运往北方的重要通道，沿岸因此兴起了许多繁华的城市。2014年，中国大运河被列入世界遗产名录。",
    "中国的地势西高东低，像一级一级的阶梯。西部有青藏高原，平均海拔在四千米以上，被称为“世界屋脊”。中部有许多高原和盆地，东部则多平原和丘陵。因为地势西高东低，中国的许多大河都是自西向东流，最后注入大海。东部平原土地肥沃，人口稠密，是重要的粮食产区。",
    "算盘是中国传统的计算工具，由木框、横梁和一串串可以上下拨动的算珠组成。常见的算盘横梁上方每档有两颗珠子，每颗代表五；下方有五颗珠子，每颗代表一。熟练的人拨动算珠，可以很快地做加减乘除。在电子计算器普及以前，商店和银行里到处都能听到打算盘的声音。2013年，珠算被列入联合国教科文组织的人类非物质文化遗产代表作名录。",
)


# ---------------------------------------------------------------- assembly
REPLAY = {
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
HELDOUT = {  # the same question forms as REPLAY over the held-out tables, or forms of their own
    "en": {
        "arithmetic": partial(arithmetic_en, HELDOUT_ARITHMETIC_EN),
        "capital": partial(capital_en, HELDOUT_CAPITAL_EN),
        "unit": heldout_unit_en,
        "antonym": partial(antonym_en, HELDOUT_ANTONYM_EN),
        "plural": partial(plural_en, HELDOUT_PLURAL_EN),
        "calendar": heldout_calendar_en,
        "science": partial(science_en, HELDOUT_SCIENCE_EN),
        "translation": partial(translation_en, HELDOUT_TRANSLATION_EN),
        "spelling": heldout_spelling_en,
    },
    "zh": {
        "arithmetic": partial(arithmetic_zh, HELDOUT_ARITHMETIC_ZH),
        "capital": partial(capital_zh, HELDOUT_CAPITAL_ZH),
        "unit": heldout_unit_zh,
        "antonym": partial(antonym_zh, HELDOUT_ANTONYM_ZH),
        "calendar": heldout_calendar_zh,
        "science": partial(science_zh, HELDOUT_SCIENCE_ZH),
        "translation": partial(translation_zh, HELDOUT_TRANSLATION_ZH),
        "spelling": heldout_spelling_zh,
    },
}


def text_key(text: str) -> str:
    """What two texts must not share: the SHA-256 of the text after NFKC, casefold and collapsed whitespace."""
    normal = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha256(normal.encode("utf-8")).hexdigest()


def build(generators: dict, prefix: str) -> list[dict]:
    """The records of one part, in id order: ids `<prefix>-<lang>-<category>-<NNN>`."""
    records, seen = [], set()
    for lang, categories in generators.items():
        for category, generate in categories.items():
            for i, (question, answer) in enumerate(generate(), start=1):
                if question in seen:
                    raise ValueError(f"duplicate question: {question}")
                if not answer.strip() or answer != answer.strip() or answer.endswith("."):
                    raise ValueError(f"bad answer {answer!r} for {question}")
                seen.add(question)
                records.append({
                    "id": f"{prefix}-{lang}-{category}-{i:03d}",
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "meta": {"task": "general", "category": category, "lang": lang},
                })
    records.sort(key=lambda r: r["id"])
    if len({r["id"] for r in records}) != len(records):
        raise ValueError("duplicate ids")
    return records


def _words(*tables) -> set[str]:
    return {word.casefold() for table in tables for pair in table for word in pair}


def check_disjoint(replay: list[dict], heldout: list[dict]) -> None:
    """The held-out part shares no id, question text, paragraph or looked-up fact with the replay part."""
    if {r["id"] for r in replay} & {r["id"] for r in heldout}:
        raise ValueError("an id is in both parts")
    questions = {text_key(r["messages"][0]["content"]) for r in replay}
    for record in heldout:
        if text_key(record["messages"][0]["content"]) in questions:
            raise ValueError(f"{record['id']}: its question is in the replay part")
    if {text_key(p) for p in ANCHOR_TEXT} & {text_key(p) for p in HELDOUT_TEXT}:
        raise ValueError("a paragraph is in both parts")
    facts = [
        ("arithmetic", set(ARITHMETIC_EN) | set(ARITHMETIC_ZH), set(HELDOUT_ARITHMETIC_EN) | set(HELDOUT_ARITHMETIC_ZH)),
        ("capital", _words(CAPITAL_EN, CAPITAL_ZH), _words(HELDOUT_CAPITAL_EN, HELDOUT_CAPITAL_ZH)),
        ("antonym", _words(ANTONYM_EN, ANTONYM_ZH), _words(HELDOUT_ANTONYM_EN, HELDOUT_ANTONYM_ZH)),
        ("plural", _words(PLURAL_EN), _words(HELDOUT_PLURAL_EN)),
        ("translation", _words(TRANSLATION_EN, TRANSLATION_ZH), _words(HELDOUT_TRANSLATION_EN, HELDOUT_TRANSLATION_ZH)),
        ("science", {q for q, _ in SCIENCE_EN + SCIENCE_ZH}, {q for q, _ in HELDOUT_SCIENCE_EN + HELDOUT_SCIENCE_ZH}),
    ]
    for name, old, new in facts:
        if old & new:
            raise ValueError(f"{name}: in both parts: {sorted(map(str, old & new))}")


def write_records(path: Path, records: list[dict]) -> None:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def write_text(path: Path, paragraphs: tuple[str, ...]) -> None:
    if len({text_key(p) for p in paragraphs}) != len(paragraphs):
        raise ValueError(f"{path.name}: a paragraph appears twice")
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8", newline="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the folder to write (default: {OUT})")
    out = parser.parse_args().out
    replay, heldout = build(REPLAY, "general"), build(HELDOUT, "general-test")
    check_disjoint(replay, heldout)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "general.jsonl", replay)
    write_text(out / "general_text.txt", ANCHOR_TEXT)
    write_records(out / "general_test.jsonl", heldout)
    write_text(out / "general_test_text.txt", HELDOUT_TEXT)
    print(f"wrote {len(replay)} replay and {len(heldout)} held-out records, {len(ANCHOR_TEXT)} anchor and "
          f"{len(HELDOUT_TEXT)} held-out paragraphs to {out}")


if __name__ == "__main__":
    main()
