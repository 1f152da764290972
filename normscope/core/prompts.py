"""The built-in prompt set and the control sequences of Gu et al. 2024.

The documents below were written for normscope (original text, free to reuse with the project). They cover
prose (narrative, expository, news-like), code (Python, JavaScript, SQL with comments), numbers and tables,
dialogue, and lists or instructions, so that an analysis run with no text of its own still sees varied
English. Each document has 150-400 words.

Controls follow Gu et al. 2024 ("When Attention Sink Emerges in Language Models: An Empirical View",
Sec. 3), who compare sink rates on natural text, on sequences of tokens drawn uniformly from the vocabulary,
and on one token repeated: a random-token sequence is uniform over the vocabulary minus special tokens
(seeded), a repeated-token sequence is one ordinary token repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

CATEGORIES = ("prose", "code", "numbers", "dialogue", "list")
CONTROL_CATEGORIES = ("random", "repeated")
# Common words tried, in a seeded order, as the repeated token; only those that are one ordinary token count.
REPEAT_CANDIDATES = (" the", " water", " house", " and", " time", " light", " of", " stone", "the", "a", ".")


@dataclass(frozen=True)
class Prompt:
    """One built-in document."""

    category: str  # one of CATEGORIES
    title: str
    text: str


_PROSE = [
    Prompt("prose", "The last winter at Harrow Point", """\
The supply boat came for the last time in the second week of November, and after that Ines Caldera had the \
island to herself. She had kept the light at Harrow Point for eleven years, long enough to know which storms \
would pass in a night and which would sit on the rock for a week, drumming on the shutters until she talked \
back to them. This winter the lamp was going to be automated. A crew would arrive in April with a solar \
panel, a battery the size of a suitcase and a small grey box that would do everything she did, only without \
complaint.

She did not resent the box. She had seen the drawings, and it was a sensible machine. What she \
minded was the \
thought of the tower at night with nobody climbing its ninety-two steps, nobody wiping salt off the \
glass with \
a folded newspaper the way her predecessor had taught her. The light would still turn. Ships would still see \
it. But the log book, with its columns of wind direction and visibility and the small notes she wrote in the \
margins, would end.

So she decided to write more in it, not less. On the first clear morning she described the colour of the \
water near the northern reef, a green so pale it looked like bottle glass. She counted the eider \
ducks riding \
the swell below the landing and wrote down the number. When a fishing trawler passed too close to \
the shoals, \
she noted its name and the hour, and then, because there was room, she added what she imagined the crew were \
eating for breakfast.

By January the book had become something else. It was still a record of weather, but it was also a record of \
attention, of a person looking carefully at one small place for a long time. She wondered who would read it. \
Perhaps a clerk in the harbour office would file it without opening it. Perhaps, years from now, \
someone would \
find it in a box and spend an afternoon learning what the wind had done on the ninth of February.

On the last night in March she climbed the steps once more, cleaned the glass, and wrote a single line: \
visibility good, sea calm, lamp burning steadily."""),
    Prompt("prose", "Morning at the Kessel bakery", """\
The alarm in the flat above the Kessel bakery rang at a quarter past three, and Tomas was already awake to \
silence it. He dressed in the dark, went down the narrow back stairs and switched on the ovens before he \
switched on the lights, because the ovens needed forty minutes and the lights needed none. The town was \
quiet. Snow had fallen in the night and the street outside the shop window was smooth and blue under the \
single lamp by the fountain.

The dough for the rye loaves had been resting since the previous evening in tall plastic tubs, each with a \
strip of tape showing the time it was mixed. Tomas lifted the lid of the first tub and smelled it: sour, \
slightly fruity, right. He tipped it onto the floured bench and began to divide it with a steel scraper, \
weighing each piece, adding a pinch here, cutting a sliver there, until the scale read eight hundred grams \
every time. His father had done this by eye and had been wrong by no more than twenty grams. Tomas used the \
scale and was never wrong at all, but he was slower, and he knew it.

By half past four the first trays were in. The bakery filled with a warm noise, the fans of the \
ovens and the \
tick of the metal as it expanded. Tomas shaped the white rolls next, rolling each ball of dough under his \
cupped palm until the surface tightened, then setting them in rows on the linen couche. He had a rhythm now. \
Shape, turn, place. Shape, turn, place.

At six his sister arrived to open the shop, stamping snow off her boots and complaining about the hill. She \
tied on her apron, filled the baskets by the counter and wrote the day's special on the chalkboard in her \
careful round letters: seed loaf with honey, two euros forty. The first customer was always the same man, a \
retired postman who bought two rolls and asked about the weather as if Tomas had any way of knowing. Today \
Tomas told him it would clear by noon. It did not, but the rolls were good, and nobody minded."""),
    Prompt("prose", "The radio on the workbench", """\
The radio had belonged to Mara's great-grandmother, and it had not made a sound in thirty years. It sat on a \
shelf in the garage, a wooden box with a cloth front and a dial marked with the names of cities that no \
longer broadcast on those frequencies. One rainy Saturday Mara carried it to her grandfather's workbench and \
asked whether it could be fixed.

Her grandfather did not answer at once. He turned the radio around, unscrewed the back panel and peered \
inside with a torch. Dust lay over everything like grey felt. There were glass valves standing in sockets, a \
tangle of cloth-covered wires, and a row of small cylinders he called capacitors. He said the \
capacitors were \
almost certainly dead, because the paste inside them dried out over the years, and that a dead capacitor was \
the commonest reason an old set stayed silent.

They spent the afternoon on it. He showed her how to use the soldering iron, how to heat the joint rather \
than the solder, how to wait until the metal flowed and then take the iron away and hold still. She burned \
her thumb once, not badly, and he made her run it under the cold tap for a full minute while he timed it on \
his watch. They replaced six capacitors and one resistor that had cracked in half. He tested each valve with \
a meter that had a needle instead of a screen, and all but one were fine.

The last valve was a problem. Nobody made them any more, he said, but there were people who collected them, \
and he knew a man two towns over who might have one in a drawer. Mara wrote down the number printed on the \
glass. It took three weeks for the replacement to arrive in a padded envelope. When they finally plugged the \
radio in and turned the knob, nothing happened for a long moment. Then the valves began to glow \
orange, a low \
hum rose from the speaker, and through the static came a man's voice reading the shipping forecast, as calm \
as if he had been waiting there the whole time."""),
    Prompt("prose", "How tides work", """\
Twice a day, on most coasts, the sea rises and falls by an amount that can be anything from a few \
centimetres to more than ten metres. The cause is gravity, mostly the Moon's, but the details are less \
obvious than they first appear.

The Moon pulls on every part of the Earth, but not equally. The side of the planet facing the Moon is closer \
to it and is pulled a little harder than the centre, while the far side is pulled a little less. What \
matters for the oceans is this difference in pull across the Earth, not the pull itself. Relative to the \
centre of the planet, water on the near side is drawn toward the Moon and water on the far side is left \
behind. The result is two bulges of water, one on each side, and as the Earth turns beneath them a given \
coastline passes through both bulges each day. That is why most places see two high tides and two low tides \
roughly every twenty-four hours and fifty minutes, the extra fifty minutes coming from the Moon's own motion \
along its orbit.

The Sun produces the same kind of effect, a little less than half as strong. When the Sun, Moon and Earth \
line up, at new moon and full moon, their effects add together and the tidal range is largest. These are \
called spring tides, though they have nothing to do with the season. When the Sun and Moon pull at right \
angles, at the quarter moons, the range is smallest; these are neap tides.

Real tides are more complicated than two tidy bulges. Continents get in the way, so the water cannot simply \
flow around the globe. Instead, each ocean basin sloshes in its own pattern, rotating around points where \
the tidal range is nearly zero. The shape of the coast and the depth of the sea floor can amplify the motion \
enormously. In a long funnel-shaped bay the incoming tide is squeezed into a narrowing space, and the water \
can rise several times higher than in the open ocean. Tide tables are therefore built from long records of \
local measurements, fitted with dozens of separate periodic components, rather than from the simple picture \
alone."""),
    Prompt("prose", "Why bread rises", """\
A loaf of bread begins as little more than flour, water, salt and a small amount of yeast, yet it ends up \
several times larger than the dough that went into the oven. The change comes from gas, produced by living \
cells and trapped by a network of protein.

Baker's yeast is a single-celled fungus. When it is mixed into dough it starts to feed on sugars, some of \
which are present in the flour and many more of which are released as enzymes break down starch. As the \
yeast digests these sugars without much oxygen, it produces carbon dioxide and alcohol, along with a range \
of compounds that give bread much of its flavour. A slow, cool fermentation produces more of these flavour \
compounds than a fast, warm one, which is why many bakers leave dough to rise overnight in a refrigerator.

The gas would simply escape if the dough could not hold it. That is the job of gluten. Wheat flour contains \
two families of proteins, glutenins and gliadins, which link together when they are wetted and worked. \
Kneading stretches and aligns them into an elastic, extensible web. Each tiny bubble of carbon dioxide \
becomes a pocket inside this web, and as more gas is produced the pockets expand and the dough swells. Salt \
tightens the gluten network and slows the yeast slightly, which is one reason it should never be left out.

In the oven the process speeds up briefly and then stops. For the first few minutes the heat makes the \
yeast work faster and makes the trapped gas expand, so the loaf grows quickly; bakers call this oven spring. \
At around sixty degrees Celsius the yeast dies. A little later the starch absorbs water and sets, and the \
proteins firm up, fixing the bubbles in place as the open, spongy crumb we see when we slice the loaf. \
Meanwhile the surface dries and browns as sugars and proteins react with each other, forming the crust. \
Rye and other low-gluten flours cannot build the same elastic web, which is why breads made mostly from them \
are denser and usually rely on sourdough acids to hold their structure together."""),
    Prompt("prose", "Expansion joints in bridges", """\
Anyone who has driven across a long bridge has probably felt a regular bump as the wheels cross a \
metal strip \
set into the road. These strips are expansion joints, and without them many bridges would crack or buckle \
within a few years.

Almost every material grows slightly when it warms and shrinks when it cools. For a short beam the change \
is tiny, but it scales with length. A steel girder one hundred metres long can change in length by several \
centimetres between a cold winter night and a hot summer afternoon. Concrete behaves in a similar way, and \
it also shrinks slowly for years after it is poured, as water leaves it, and creeps under a constant load. \
If the ends of a long deck were fixed rigidly to the abutments, all of this movement would have nowhere to \
go. The deck would push against its supports in summer and pull away from them in winter, and the forces \
involved would be enormous.

Engineers therefore divide the structure into sections that are free to move, and they bridge the gaps \
between sections with joints designed to open and close. On a small bridge the joint may be a simple rubber \
seal between two steel angles. On a large one it may be a modular joint with several parallel steel beams \
separated by rubber strips, able to accommodate movements of half a metre or more. The deck itself sits on \
bearings that allow it to slide or rotate slightly, often pads of laminated rubber and steel, or \
steel plates \
coated with a low-friction plastic.

Joints are among the parts of a bridge that need the most maintenance. They take a hammering from every \
passing wheel, and they let water, grit and road salt into places that would otherwise stay dry. For this \
reason designers of modern short and medium bridges often try to avoid them altogether, building integral \
bridges whose decks are connected directly to flexible abutments. The movement still happens, but it is \
absorbed by the supports and the soil behind them instead of by a joint in the road surface."""),
    Prompt("prose", "Heat in the city", """\
On a still summer evening the centre of a large city can be several degrees warmer than the farmland around \
it. This difference, known as the urban heat island, is one of the clearest examples of people changing the \
climate of a place without intending to.

Several things contribute. Dark roofs and asphalt roads absorb more sunlight than fields or forests, and \
brick, stone and concrete store that heat during the day and release it slowly through the night. Tall \
buildings trap radiation between them, so heat that would escape to the sky from an open field bounces from \
wall to wall instead. Cities also have far less vegetation and bare soil. Plants and moist ground cool their \
surroundings by evaporating water, the same way sweat cools skin, and when they are replaced by sealed \
surfaces that cooling disappears. Finally, cities generate heat of their own, from engines, air \
conditioners, industry and the bodies of millions of people.

The effect is usually strongest at night and in calm, clear weather. During the day a rural area may warm \
almost as much as a city, but after sunset the fields cool quickly while the streets keep radiating the heat \
they have stored. For people who live in crowded flats without air conditioning, the lack of relief at night \
is what makes a heat wave dangerous, because the body never gets a chance to recover.

There are ways to reduce the effect. Roofs and pavements can be made lighter in colour so that they reflect \
more sunlight. Trees along streets provide shade and evaporative cooling, and parks create pockets of cooler \
air that can spread a few hundred metres into the surrounding neighbourhood. Green roofs, covered with soil \
and low plants, insulate buildings and hold rainwater. Planners also pay attention to the way streets are \
oriented, since corridors that line up with prevailing winds help to ventilate a district. None of these \
measures is dramatic on its own, but together they can lower peak temperatures noticeably where people \
actually live and work."""),
    Prompt("prose", "Council approves riverside cycle route", """\
WESTBRIDGE - The town council voted seven to four on Tuesday night to build a protected cycle route \
along the \
river, ending a debate that has run for almost two years and filled the public gallery at every \
meeting where \
it appeared on the agenda.

The route will run for 3.2 kilometres from the railway station to the new secondary school on Mill Lane, \
using a strip of land between the towpath and the road that is currently taken up by parallel parking. About \
ninety parking spaces will be removed, and the council has promised to replace roughly half of them with a \
small car park on the site of the former bus depot.

Supporters said the scheme would make it safer for children to cycle to school and would reduce traffic on \
the narrow bridge at the town centre during the morning rush. Councillor Priya Anand, who chairs the \
transport committee, told the meeting that surveys of parents showed more than sixty per cent would let \
their children ride if there were a separated lane. "This is not about punishing drivers," she said. "It is \
about giving families a choice they do not have today."

Opponents, including several owners of shops on River Street, argued that losing the parking would drive \
customers to the retail park on the edge of town. Daniel Hart, who runs a hardware store near the bridge, \
said his deliveries already struggled to find space to unload. The council agreed to add two loading bays \
and to review the effect on trade after twelve months.

Construction is expected to begin in the spring and to take about five months, with the section near the \
station built first. The estimated cost of 2.4 million pounds will be covered mostly by a regional transport \
grant, with the remainder coming from the council's capital budget. A public consultation on the detailed \
design, including the location of crossings and the treatment of junctions, will open next month and run for \
six weeks. Residents will be able to comment online or at drop-in sessions at the town library."""),
    Prompt("prose", "Library extends opening hours", """\
NORTHFIELD - The central library will open until nine o'clock on weekday evenings from the start of next \
month, after a survey of residents found that its current hours shut out many of the people who most wanted \
to use it.

The library now closes at six on weekdays and at four on Saturdays. More than two thousand people answered \
the survey, which was distributed online, in community centres and on paper at the library desk. Almost half \
said they could not visit during the existing hours because of work, and students at the nearby further \
education college asked in large numbers for a quiet place to study in the evening.

Head librarian Olufemi Adeyemi said the change had been possible because of a reorganisation of staff \
shifts rather than new hiring. "We looked at when the building was busiest and when it was almost empty," \
she said. "Tuesday mornings, for example, are very quiet, so we will open an hour later on Tuesdays and use \
those hours in the evening instead." The Saturday hours will not change.

The evening opening will include access to the computers, the printing service and the study rooms on the \
first floor. The children's section will close at seven, because it shares staff with the after-school \
homework club. Evening users will need to enter by the side door on Park Road, which will be fitted with \
better lighting and a camera before the new hours begin.

The library will review attendance after six months. If the evenings are well used, the council has said it \
may consider Sunday opening at the two largest branch libraries, which was the second most common request \
in the survey. Some respondents also asked for more events for adults, such as reading groups and talks, and \
the library said it would trial a monthly evening talk starting in the autumn, beginning with a local \
historian speaking about the town's old textile mills and the families who worked in them."""),
    Prompt("prose", "Storm leaves thousands without power", """\
About fourteen thousand homes across the eastern valleys were still without electricity on Thursday \
morning, a day after a storm brought gusts of more than one hundred kilometres an hour and brought down \
trees across power lines and roads.

The regional electricity operator said its crews had restored supply to more than thirty thousand \
customers overnight but warned that some remote properties might have to wait until the weekend. Many of \
the remaining faults are on rural lines that run through woodland, where engineers must first clear fallen \
trees before they can reach the damaged cables. Extra crews have been brought in from neighbouring regions, \
and a helicopter is being used to inspect lines in areas that are hard to reach by road.

Several schools in the upper valley stayed closed for a second day, and the main road over the pass was shut \
in both directions while a landslide was cleared. Police asked drivers to avoid unnecessary journeys and to \
treat junctions with broken traffic lights as if they were uncontrolled crossings. Two people were \
treated in \
hospital for minor injuries after a tree fell on their car near the village of Aldham; both have since been \
released.

The local council opened its sports hall in the market town as a warm space, with hot drinks, phone \
charging and showers available from eight in the morning until ten at night. A council spokesperson said \
around two hundred people had visited on Wednesday evening, many of them elderly residents whose heating \
depends on electric pumps. Volunteers have also been checking on vulnerable neighbours identified by the \
district nursing service.

Forecasters said the wind would ease through Thursday, though heavy showers could cause localised flooding \
where drains are blocked by leaves and debris. The electricity operator reminded residents never to approach \
a fallen line, even if it appears to be dead, and to report damage by telephone rather than trying to clear \
it themselves. Customers who are without power for more than forty-eight hours may be entitled to \
compensation under the operator's service standards."""),
]

_CODE = [
    Prompt("code", "Python: rolling statistics over a CSV", '''\
"""Compute a rolling mean and standard deviation of one column in a CSV file.

Usage: python rolling.py readings.csv temperature --window 24
"""

import argparse
import csv
import math
from collections import deque


def rolling_stats(values, window):
    """Yield (mean, std) for each position once `window` values have been seen.

    Keeps a running sum and sum of squares so each step costs O(1) instead of O(window).
    """
    buf = deque()
    total = 0.0
    total_sq = 0.0
    for x in values:
        buf.append(x)
        total += x
        total_sq += x * x
        if len(buf) > window:
            old = buf.popleft()
            total -= old
            total_sq -= old * old
        if len(buf) == window:
            mean = total / window
            # max() guards against tiny negative values from floating-point rounding
            var = max(total_sq / window - mean * mean, 0.0)
            yield mean, math.sqrt(var)


def read_column(path, column):
    """Read one numeric column, skipping rows where it is empty or not a number."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if column not in reader.fieldnames:
            raise SystemExit(f"no column {column!r} in {path}; columns are {reader.fieldnames}")
        for row in reader:
            try:
                yield float(row[column])
            except (TypeError, ValueError):
                continue


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("column")
    parser.add_argument("--window", type=int, default=12)
    args = parser.parse_args()
    if args.window < 2:
        parser.error("--window must be at least 2")
    for i, (mean, std) in enumerate(rolling_stats(read_column(args.path, args.column), args.window)):
        print(f"{i + args.window:6d}  mean={mean:9.3f}  std={std:8.3f}")


if __name__ == "__main__":
    main()
'''),
    Prompt("code", "Python: a small LRU cache", '''\
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A fixed-size cache that evicts the least recently used entry.

    OrderedDict keeps keys in insertion order, and move_to_end lets us mark a key as
    freshly used in constant time, so both get and put are O(1).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K, default: V | None = None) -> V | None:
        """Return the value for key and mark it as recently used."""
        if key not in self._data:
            self.misses += 1
            return default
        self.hits += 1
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: K, value: V) -> None:
        """Insert or update a key, evicting the oldest entry if the cache is full."""
        if key in self._data:
            self._data.move_to_end(key)
        self._data[key] = value
        if len(self._data) > self.capacity:
            # popitem(last=False) removes the first, i.e. least recently used, item
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def hit_rate(self) -> float:
        """Share of lookups that found their key; 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


if __name__ == "__main__":
    cache: LRUCache[str, int] = LRUCache(capacity=2)
    cache.put("apples", 3)
    cache.put("pears", 5)
    cache.get("apples")      # apples is now the most recent
    cache.put("plums", 7)    # evicts pears, the least recent
    assert cache.get("pears") is None
    assert cache.get("plums") == 7
    print(f"size={len(cache)} hit rate={cache.hit_rate():.2f}")
'''),
    Prompt("code", "Python: unit conversion tool", '''\
#!/usr/bin/env python3
"""Convert between units of length, mass and temperature from the command line.

Examples:
    convert.py 5 km mi
    convert.py 72 F C
"""

import sys

# Factors to the base unit of each dimension: metres for length, kilograms for mass.
LENGTH = {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048, "mi": 1609.344}
MASS = {"g": 0.001, "kg": 1.0, "t": 1000.0, "oz": 0.028349523125, "lb": 0.45359237}
TEMPERATURE = {"C", "F", "K"}


def convert_temperature(value: float, src: str, dst: str) -> float:
    """Temperatures are affine, not proportional, so they go through Celsius explicitly."""
    to_celsius = {"C": lambda v: v, "F": lambda v: (v - 32) * 5 / 9, "K": lambda v: v - 273.15}
    from_celsius = {"C": lambda c: c, "F": lambda c: c * 9 / 5 + 32, "K": lambda c: c + 273.15}
    return from_celsius[dst](to_celsius[src](value))


def convert(value: float, src: str, dst: str) -> float:
    """Convert value from unit src to unit dst, or raise ValueError with the reason."""
    for table in (LENGTH, MASS):
        if src in table and dst in table:
            return value * table[src] / table[dst]
    if src in TEMPERATURE and dst in TEMPERATURE:
        return convert_temperature(value, src, dst)
    known = LENGTH.keys() | MASS.keys() | TEMPERATURE
    if src in known and dst in known:
        # e.g. "km" to "kg": both units exist but measure different things
        raise ValueError(f"cannot convert {src} to {dst}: they measure different things")
    raise ValueError(f"unknown unit pair {src} -> {dst}")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        value = float(argv[1])
        result = convert(value, argv[2], argv[3])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # Round for display only; keep full precision in the computation.
    print(f"{value:g} {argv[2]} = {result:.4g} {argv[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''),
    Prompt("code", "JavaScript: debounced search box", '''\
// Search-as-you-type without flooding the server: wait until the user pauses typing.

/**
 * Return a function that delays calling `fn` until `waitMs` milliseconds have passed
 * since the last call. Each new call resets the timer.
 */
function debounce(fn, waitMs) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), waitMs);
  };
}

const input = document.querySelector("#search");
const list = document.querySelector("#results");
const status = document.querySelector("#status");

// Remember the latest query so that slow responses for old queries are ignored.
let latestQuery = "";

async function runSearch(query) {
  latestQuery = query;
  if (query.trim().length < 2) {
    list.replaceChildren();
    status.textContent = "Type at least two letters.";
    return;
  }
  status.textContent = "Searching...";
  try {
    const response = await fetch(`/api/search?q=${encodeURIComponent(query)}`);
    if (!response.ok) {
      throw new Error(`server answered ${response.status}`);
    }
    const items = await response.json();
    if (query !== latestQuery) {
      return; // a newer search has started; drop this stale result
    }
    renderResults(items);
    status.textContent = `${items.length} result${items.length === 1 ? "" : "s"}`;
  } catch (err) {
    status.textContent = `Search failed: ${err.message}`;
  }
}

function renderResults(items) {
  // Build list items with textContent, never innerHTML, so titles cannot inject markup.
  const nodes = items.map((item) => {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = item.url;
    link.textContent = item.title;
    li.appendChild(link);
    return li;
  });
  list.replaceChildren(...nodes);
}

input.addEventListener(
  "input",
  debounce((event) => runSearch(event.target.value), 300)
);
'''),
    Prompt("code", "JavaScript: fetch with retries", '''\
/**
 * Fetch a URL and retry on network errors and on 5xx or 429 responses,
 * waiting longer after each failure (exponential backoff with jitter).
 *
 * @param {string} url
 * @param {object} options  fetch options plus { retries, baseDelayMs, timeoutMs }
 * @returns {Promise<Response>}
 */
export async function fetchWithRetry(url, options = {}) {
  const { retries = 4, baseDelayMs = 250, timeoutMs = 10000, ...fetchOptions } = options;

  for (let attempt = 0; ; attempt++) {
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), timeoutMs);
    try {
      const response = await fetch(url, { ...fetchOptions, signal: controller.signal });
      // Client errors such as 404 will not improve by retrying, so return them at once.
      if (response.ok || (response.status < 500 && response.status !== 429)) {
        return response;
      }
      if (attempt >= retries) {
        return response;
      }
      await sleep(retryDelay(response, attempt, baseDelayMs));
    } catch (err) {
      if (attempt >= retries) {
        throw new Error(`giving up on ${url} after ${attempt + 1} attempts: ${err.message}`);
      }
      await sleep(backoff(attempt, baseDelayMs));
    } finally {
      clearTimeout(timeout);
    }
  }
}

function backoff(attempt, baseDelayMs) {
  // Full jitter: a random delay between zero and the exponential cap spreads out
  // clients that all failed at the same moment.
  const cap = baseDelayMs * 2 ** attempt;
  return Math.random() * cap;
}

function retryDelay(response, attempt, baseDelayMs) {
  // Respect the server's Retry-After header when it gives a number of seconds.
  const header = response.headers.get("Retry-After");
  const seconds = Number(header);
  if (header !== null && Number.isFinite(seconds)) {
    return seconds * 1000;
  }
  return backoff(attempt, baseDelayMs);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Example:
// const res = await fetchWithRetry("/api/orders", { retries: 3, timeoutMs: 5000 });
// const orders = await res.json();
'''),
    Prompt("code", "SQL: schema for a lending library", '''\
-- Schema for a small lending library: members borrow copies of books.
-- A "book" is a title; a "copy" is one physical item on the shelf.

CREATE TABLE member (
    member_id     INTEGER PRIMARY KEY,
    full_name     TEXT NOT NULL,
    email         TEXT UNIQUE,
    joined_on     DATE NOT NULL DEFAULT CURRENT_DATE,
    -- Members can be suspended for unpaid fines without deleting their history.
    is_active     BOOLEAN NOT NULL DEFAULT TRUE
);

CREATE TABLE book (
    book_id       INTEGER PRIMARY KEY,
    title         TEXT NOT NULL,
    author        TEXT NOT NULL,
    isbn          TEXT UNIQUE,
    published     INTEGER CHECK (published BETWEEN 1450 AND 2100)
);

CREATE TABLE copy (
    copy_id       INTEGER PRIMARY KEY,
    book_id       INTEGER NOT NULL REFERENCES book (book_id),
    shelf         TEXT NOT NULL,
    condition     TEXT NOT NULL DEFAULT 'good'
                  CHECK (condition IN ('new', 'good', 'worn', 'damaged', 'lost'))
);

CREATE TABLE loan (
    loan_id       INTEGER PRIMARY KEY,
    copy_id       INTEGER NOT NULL REFERENCES copy (copy_id),
    member_id     INTEGER NOT NULL REFERENCES member (member_id),
    borrowed_on   DATE NOT NULL DEFAULT CURRENT_DATE,
    due_on        DATE NOT NULL,
    returned_on   DATE,
    CHECK (due_on > borrowed_on),
    CHECK (returned_on IS NULL OR returned_on >= borrowed_on)
);

-- A copy can be on loan to at most one member at a time:
-- a partial unique index only covers loans that are still open.
CREATE UNIQUE INDEX one_open_loan_per_copy
    ON loan (copy_id)
    WHERE returned_on IS NULL;

-- Speeds up the most common question at the desk: what does this member have out?
CREATE INDEX loan_by_member ON loan (member_id, returned_on);

-- Books that are available right now, with how many copies are on the shelf.
CREATE VIEW available_books AS
SELECT b.book_id, b.title, b.author, COUNT(c.copy_id) AS copies_on_shelf
FROM book AS b
JOIN copy AS c ON c.book_id = b.book_id
LEFT JOIN loan AS l ON l.copy_id = c.copy_id AND l.returned_on IS NULL
WHERE l.loan_id IS NULL
  AND c.condition <> 'lost'
GROUP BY b.book_id, b.title, b.author;
'''),
    Prompt("code", "SQL: monthly revenue report", '''\
-- Monthly revenue per product category, with the change from the previous month
-- and each category's share of the month's total.

WITH order_lines AS (
    -- One row per item sold; refunded orders are excluded entirely.
    SELECT
        DATE_TRUNC('month', o.ordered_at) AS month,
        p.category,
        oi.quantity * oi.unit_price        AS line_total
    FROM orders AS o
    JOIN order_items AS oi ON oi.order_id = o.order_id
    JOIN products AS p     ON p.product_id = oi.product_id
    WHERE o.status <> 'refunded'
      AND o.ordered_at >= DATE '2023-01-01'
),
monthly AS (
    SELECT month, category, SUM(line_total) AS revenue
    FROM order_lines
    GROUP BY month, category
)
SELECT
    month,
    category,
    ROUND(revenue, 2) AS revenue,
    -- LAG looks one month back within the same category; NULL for the first month.
    ROUND(revenue - LAG(revenue) OVER (PARTITION BY category ORDER BY month), 2)
        AS change_from_prev,
    -- NULLIF avoids dividing by zero when the previous month had no sales.
    ROUND(
        100.0 * (revenue - LAG(revenue) OVER (PARTITION BY category ORDER BY month))
        / NULLIF(LAG(revenue) OVER (PARTITION BY category ORDER BY month), 0),
        1
    ) AS pct_change,
    ROUND(100.0 * revenue / SUM(revenue) OVER (PARTITION BY month), 1) AS pct_of_month,
    -- Rank categories within each month, largest first.
    RANK() OVER (PARTITION BY month ORDER BY revenue DESC) AS rank_in_month
FROM monthly
ORDER BY month, rank_in_month;

-- Top three customers by lifetime spend, counting only completed orders.
SELECT c.customer_id, c.name, SUM(oi.quantity * oi.unit_price) AS lifetime_spend,
       COUNT(DISTINCT o.order_id) AS orders
FROM customers AS c
JOIN orders AS o       ON o.customer_id = c.customer_id AND o.status = 'completed'
JOIN order_items AS oi ON oi.order_id = o.order_id
GROUP BY c.customer_id, c.name
ORDER BY lifetime_spend DESC
LIMIT 3;
'''),
]

_NUMBERS = [
    Prompt("numbers", "Monthly rainfall at three stations", """\
Monthly rainfall in millimetres, with the number of rain days in brackets.

| Month | Hillcrest | Lower Ford | Saltmarsh |
|-------|-----------|------------|-----------|
| Jan | 112.4 (18) | 86.0 (15) | 64.2 (13) |
| Feb | 95.1 (16) | 71.3 (13) | 52.8 (11) |
| Mar | 88.7 (15) | 63.9 (12) | 49.5 (10) |
| Apr | 61.2 (12) | 47.5 (10) | 38.1 (9) |
| May | 58.9 (11) | 51.2 (10) | 41.7 (8) |
| Jun | 54.3 (10) | 49.8 (9) | 36.0 (7) |
| Jul | 49.6 (9) | 44.1 (8) | 30.9 (6) |
| Aug | 67.8 (11) | 58.6 (10) | 44.3 (8) |
| Sep | 79.5 (12) | 62.0 (11) | 50.6 (9) |
| Oct | 121.9 (17) | 93.4 (15) | 71.2 (12) |
| Nov | 130.6 (19) | 101.7 (17) | 79.8 (14) |
| Dec | 126.3 (19) | 97.2 (16) | 73.5 (14) |
| Year | 1046.3 (169) | 826.7 (146) | 632.6 (121) |

Summary: Hillcrest, at 310 metres above sea level, is the wettest of the three stations, receiving about 27 \
per cent more rain than Lower Ford and 65 per cent more than Saltmarsh on the coast. The wettest \
month at all \
three stations is November, and the driest is July. The difference between the wettest and driest month is \
81.0 mm at Hillcrest, 57.6 mm at Lower Ford and 48.9 mm at Saltmarsh.

The heaviest single day in the record was 48.2 mm at Hillcrest on 14 October, when a slow-moving \
front stalled \
over the hills. The longest dry spell was 23 days at Saltmarsh, from 2 to 24 July. Compared with the 30-year \
average (1991 to 2020), the year was 6.4 per cent wetter at Hillcrest, 2.1 per cent wetter at Lower Ford and \
3.8 per cent drier at Saltmarsh."""),
    Prompt("numbers", "Quarterly results of a small manufacturer", """\
Quarterly results (thousands of euros unless stated)

| | Q1 | Q2 | Q3 | Q4 | Full year |
|---|---|---|---|---|---|
| Revenue | 4,812 | 5,136 | 4,977 | 6,204 | 21,129 |
| Cost of goods sold | 3,031 | 3,184 | 3,136 | 3,784 | 13,135 |
| Gross profit | 1,781 | 1,952 | 1,841 | 2,420 | 7,994 |
| Gross margin (%) | 37.0 | 38.0 | 37.0 | 39.0 | 37.8 |
| Operating expenses | 1,402 | 1,455 | 1,437 | 1,598 | 5,892 |
| Operating profit | 379 | 497 | 404 | 822 | 2,102 |
| Operating margin (%) | 7.9 | 9.7 | 8.1 | 13.2 | 9.9 |
| Units shipped | 18,450 | 19,720 | 19,010 | 23,360 | 80,540 |
| Average price per unit (EUR) | 260.8 | 260.4 | 261.8 | 265.6 | 262.3 |
| Employees at quarter end | 142 | 145 | 147 | 151 | 151 |

Comments: Revenue grew 8.3 per cent compared with the previous year (19,510). The fourth quarter is \
seasonally the strongest because of orders ahead of the heating season; Q4 revenue was 24.6 per \
cent above Q3. \
Gross margin improved by 1.4 points over the year, mainly because steel prices fell from an average of 812 \
euros per tonne in Q1 to 731 euros in Q4.

Operating expenses rose 5.1 per cent, with most of the increase in wages (9 new employees) and a one-off \
cost of 64 for moving the warehouse. Excluding that cost, the operating margin for the year would have been \
10.2 per cent.

Cash at year end was 3,415, up from 2,880. Capital expenditure was 1,120, of which 780 went on a new laser \
cutting line that is expected to reduce scrap from 4.5 per cent of steel used to about 2.8 per cent. The \
order book at 31 December stood at 5,360, equal to roughly 10 weeks of production at the Q4 rate."""),
    Prompt("numbers", "Weekday train timetable", """\
Weekday timetable, Eastvale to Port Ansel (valid from 3 March)

| Eastvale | Brookfield | Carrow Junction | Millbank | Port Ansel |
|---|---|---|---|---|
| 05:42 | 05:51 | 06:04 | 06:18 | 06:35 |
| 06:12 | 06:21 | 06:34 | 06:48 | 07:05 |
| 06:38 | - | 06:55 | - | 07:22 |
| 07:02 | 07:11 | 07:24 | 07:38 | 07:55 |
| 07:27 | 07:36 | 07:49 | 08:03 | 08:20 |
| 07:48 | - | 08:05 | - | 08:31 |
| 08:12 | 08:21 | 08:34 | 08:48 | 09:05 |
| 09:12 | 09:21 | 09:34 | 09:48 | 10:05 |
| 10:12 | 10:21 | 10:34 | 10:48 | 11:05 |
| 11:12 | 11:21 | 11:34 | 11:48 | 12:05 |
| 12:12 | 12:21 | 12:34 | 12:48 | 13:05 |
| 13:12 | 13:21 | 13:34 | 13:48 | 14:05 |
| 14:12 | 14:21 | 14:34 | 14:48 | 15:05 |
| 15:12 | 15:21 | 15:34 | 15:48 | 16:05 |
| 16:02 | 16:11 | 16:24 | 16:38 | 16:55 |
| 16:32 | - | 16:49 | - | 17:16 |
| 17:02 | 17:11 | 17:24 | 17:38 | 17:55 |
| 17:32 | 17:41 | 17:54 | 18:08 | 18:25 |
| 18:12 | 18:21 | 18:34 | 18:48 | 19:05 |
| 19:12 | 19:21 | 19:34 | 19:48 | 20:05 |
| 20:42 | 20:51 | 21:04 | 21:18 | 21:35 |
| 22:12 | 22:21 | 22:34 | 22:48 | 23:05 |

Notes: A dash means the train does not stop. Fast trains (06:38, 07:48 and 16:32 from Eastvale) take 44 \
minutes; stopping trains take 53 minutes. Between 09:12 and 15:12 trains leave Eastvale at 12 minutes past \
every hour. Change at Carrow Junction for the branch line to Hollins (connections within 8 \
minutes). A single \
adult fare from Eastvale to Port Ansel costs 7.40, a day return 11.20 and a weekly season ticket 41.50."""),
    Prompt("numbers", "Nutrition and quantities for a batch of granola", """\
Batch granola: quantities for 1, 2 and 4 trays

| Ingredient | 1 tray | 2 trays | 4 trays |
|---|---|---|---|
| Rolled oats | 300 g | 600 g | 1.2 kg |
| Almonds, chopped | 80 g | 160 g | 320 g |
| Sunflower seeds | 50 g | 100 g | 200 g |
| Pumpkin seeds | 50 g | 100 g | 200 g |
| Honey | 90 g | 180 g | 360 g |
| Sunflower oil | 45 ml | 90 ml | 180 ml |
| Cinnamon | 1 tsp | 2 tsp | 4 tsp |
| Salt | 1/4 tsp | 1/2 tsp | 1 tsp |
| Raisins (added after baking) | 70 g | 140 g | 280 g |

One tray makes about 690 g of granola, or 14 portions of 50 g.

Nutrition per 50 g portion (approximate)

| | Amount | Per 100 g |
|---|---|---|
| Energy | 228 kcal (954 kJ) | 456 kcal (1,908 kJ) |
| Fat | 10.6 g | 21.2 g |
| of which saturates | 1.1 g | 2.2 g |
| Carbohydrate | 27.3 g | 54.6 g |
| of which sugars | 9.8 g | 19.6 g |
| Fibre | 3.9 g | 7.8 g |
| Protein | 6.4 g | 12.8 g |
| Salt | 0.06 g | 0.12 g |

Baking: 160 degrees Celsius (140 with a fan) for 25 to 30 minutes, stirring every 10 minutes. Larger \
batches need separate trays; piling the mixture deeper than about 2 cm makes it steam instead of crisp. \
Cost per tray at current prices is roughly 3.85, or 0.28 per portion. Stored in an airtight jar, the granola \
keeps for 3 weeks. A 40 g portion with 150 ml of semi-skimmed milk adds about 70 kcal and 5.3 g of \
protein."""),
    Prompt("numbers", "League table after 22 rounds", """\
Regional football league, table after 22 of 30 rounds

| Pos | Team | P | W | D | L | GF | GA | GD | Pts |
|---|---|---|---|---|---|---|---|---|---|
| 1 | Harbour Rovers | 22 | 15 | 4 | 3 | 47 | 19 | +28 | 49 |
| 2 | Kingsmoor Athletic | 22 | 14 | 5 | 3 | 41 | 20 | +21 | 47 |
| 3 | Eastvale Town | 22 | 12 | 6 | 4 | 38 | 24 | +14 | 42 |
| 4 | Millbank United | 22 | 11 | 5 | 6 | 35 | 27 | +8 | 38 |
| 5 | St Aldric's | 22 | 10 | 6 | 6 | 33 | 28 | +5 | 36 |
| 6 | Carrow FC | 22 | 9 | 7 | 6 | 30 | 26 | +4 | 34 |
| 7 | Brookfield Wanderers | 22 | 8 | 6 | 8 | 29 | 31 | -2 | 30 |
| 8 | Northfield Albion | 22 | 8 | 4 | 10 | 27 | 32 | -5 | 28 |
| 9 | Port Ansel | 22 | 7 | 6 | 9 | 25 | 30 | -5 | 27 |
| 10 | Westbridge Celtic | 22 | 6 | 7 | 9 | 24 | 29 | -5 | 25 |
| 11 | Hollins Park | 22 | 6 | 5 | 11 | 22 | 35 | -13 | 23 |
| 12 | Saltmarsh Town | 22 | 5 | 6 | 11 | 21 | 34 | -13 | 21 |
| 13 | Aldham Villa | 22 | 4 | 6 | 12 | 19 | 37 | -18 | 18 |
| 14 | Lower Ford | 22 | 3 | 5 | 14 | 17 | 36 | -19 | 14 |

P played, W won, D drawn, L lost, GF goals for, GA goals against, GD goal difference. Three points for a \
win, one for a draw. The top team is promoted; the bottom two are relegated.

With 8 rounds left, Harbour Rovers lead by 2 points and have the best defence, conceding 0.86 goals per \
game. Kingsmoor Athletic have lost only once in their last 12 matches. Lower Ford are 7 points from safety \
and would need at least 5 wins from their last 8 games. The league's top scorer is Harbour's Sami Okoro with \
17 goals in 21 appearances; the average across all 154 matches so far is 2.66 goals per game."""),
]

_DIALOGUE = [
    Prompt("dialogue", "At the bicycle repair shop", """\
CUSTOMER: Hi, I think something's wrong with my gears. It keeps jumping when I pedal hard.
MECHANIC: Jumping on the back or the front?
CUSTOMER: The back, I think. It sort of clicks and the pedals slip forward for a second.
MECHANIC: Okay. Let's put it on the stand. When did it start?
CUSTOMER: About two weeks ago. I went up a steep hill and it just started doing it, and now it happens on \
flat roads too.
MECHANIC: Right. See this? The chain's stretched. I'm putting this gauge in, and it drops all the way \
through. That means the chain's worn past the limit.
CUSTOMER: Chains stretch? I thought they were metal.
MECHANIC: They don't really stretch, the pins and rollers wear, so the links get a tiny bit longer each. \
Over a hundred links it adds up. A worn chain doesn't sit properly on the teeth, so under load it rides up \
and skips.
CUSTOMER: So I just need a new chain?
MECHANIC: Maybe. The trouble is that a worn chain wears the cassette as well, the cluster of sprockets on \
the back wheel. If we put a new chain on old sprockets, sometimes it skips even worse. I'll fit the \
new chain \
and try it. If it skips on the gears you use most, you'll need a cassette too.
CUSTOMER: How much would that be?
MECHANIC: Chain's twenty-two, fitted. Cassette would be another thirty-five plus fitting. I'll ring \
you before \
I do the cassette.
CUSTOMER: That's fine. How long does a chain usually last?
MECHANIC: Depends how you ride and how you look after it. Keep it clean and oiled and you might get three or \
four thousand kilometres. Ride it through winter salt without wiping it and you'll be lucky to get half that.
CUSTOMER: I'm guilty of that. I never clean it.
MECHANIC: Most people don't. Wipe it with a rag once a week, put a drop of oil on each roller, and wipe the \
extra off. Too much oil just collects grit.
CUSTOMER: Got it. Can I pick it up tomorrow?
MECHANIC: Should be ready by four. If it needs the cassette, maybe five.
CUSTOMER: Great, thanks. My number's on the tag."""),
    Prompt("dialogue", "Planning a hike", """\
Lena: Are we still on for Saturday?
Omar: Definitely. I was looking at the ridge walk from the reservoir. It's about fourteen kilometres.
Lena: Fourteen is fine, but how much climbing?
Omar: Around six hundred metres, most of it in the first hour. After that it follows the ridge and drops \
gently back to the car park.
Lena: That's doable. What's the weather doing?
Omar: The forecast says dry until mid-afternoon, then showers, and the wind picks up on the tops. \
So an early \
start would be good.
Lena: How early is early?
Omar: If we leave town at seven, we'd be walking by half eight and off the ridge by one.
Lena: Seven. Fine. I'll bring coffee in a flask, otherwise I'm useless.
Omar: Deal. Do you have proper boots now? Last time your trainers were soaked in ten minutes.
Lena: I bought boots in the sale. I've worn them around the house to break them in, but I haven't walked far \
in them.
Omar: Bring plasters then, and a spare pair of socks. New boots can rub on the first long walk.
Lena: Good idea. What about food?
Omar: I'll make sandwiches for both of us if you bring snacks. There's a sheltered spot by the \
cairn where we \
could stop for lunch.
Lena: I'll bring fruit and the flapjacks I made. Should we tell someone where we're going?
Omar: Yes, I'll send my brother the route and the time we expect to be back. There's no phone signal on most \
of the ridge.
Lena: And if the weather turns early?
Omar: There's a path down from the saddle halfway along. It cuts the walk to nine kilometres. If the cloud \
comes down or the wind is too strong, we take it, no arguing.
Lena: No arguing from me. I'll be the one asking to take it.
Omar: Then I'll pick you up at five to seven. Look for the green car, it's my neighbour's.
Lena: See you then. And thanks for planning it all."""),
    Prompt("dialogue", "Interview with a beekeeper", """\
Interviewer: How did you start keeping bees?
Beekeeper: By accident, really. A swarm landed in the apple tree in my garden about twelve years ago. A \
neighbour who kept bees came over with a cardboard box, shook them in, and asked if I wanted to keep them. I \
said yes before I knew what I was agreeing to.
Interviewer: And now you have how many hives?
Beekeeper: Twenty-six, spread over four sites. I try not to put too many in one place, so they aren't all \
competing for the same flowers.
Interviewer: What does a typical week look like in the summer?
Beekeeper: In May and June I open every hive about once a week. I'm checking that the queen is laying, that \
there's enough space, and that they aren't building queen cells to swarm. If they are, I split the colony, \
so I keep the bees instead of losing half of them to a tree in someone else's garden.
Interviewer: People worry a lot about bees disappearing. Is that what you see?
Beekeeper: Honeybees are managed animals, like sheep, so their numbers depend on beekeepers. The \
bigger worry \
is wild bees: bumblebees and the hundreds of solitary species. They need flowers from early spring to late \
autumn and places to nest, and both are harder to find than they used to be.
Interviewer: What's the hardest part of the job?
Beekeeper: Winter, in a way, because there's nothing you can do. You make sure they have enough stores and a \
dry hive, and then you wait. Every spring you lift the lids and find out which colonies made it.
Interviewer: And the best part?
Beekeeper: Standing next to a hive on a warm evening and listening. A strong colony has a particular hum, \
steady and content. Also the honey, of course. Each site tastes different. The hives near the lime trees \
make a pale, minty honey, and the ones on the heath make a dark one that sets like toffee.
Interviewer: Any advice for someone thinking of starting?
Beekeeper: Join a local association and spend a season helping someone else before you buy anything. And \
don't name your queens. You'll only get attached."""),
    Prompt("dialogue", "Fractions after school", """\
Student: I don't get why you have to find a common denominator. Why can't I just add the tops and the bottoms?
Teacher: Let's try it and see. What's one half plus one half?
Student: One whole.
Teacher: And if you add the tops and the bottoms?
Student: One plus one is two, two plus two is four... two quarters. Oh. That's a half, not a whole.
Teacher: So that method gives the wrong answer even for the easiest case. Here's a way to think \
about it. The \
bottom number tells you what size the pieces are. The top tells you how many pieces you have.
Student: So one third is one piece, and the piece is a third of something.
Teacher: Exactly. Now, one third plus one sixth. Can you add one piece to one piece and say you have two \
pieces?
Student: Not really, because they're different sizes.
Teacher: Right. It's like adding two coins without saying which coins. So we cut the pieces until they're \
the same size. If you cut each third into two, what do you get?
Student: Sixths. One third is two sixths.
Teacher: So the sum is?
Student: Two sixths plus one sixth is three sixths. Which is one half.
Teacher: Good. That's all a common denominator is: cutting both fractions into pieces of the same size, so \
the tops can be added.
Student: Do I always multiply the bottoms together?
Teacher: That always works, but it can give big numbers. For a quarter plus a sixth, multiplying gives \
twenty-fourths. Is there a smaller size both fit into?
Student: Twelfths? Four goes into twelve and six goes into twelve.
Teacher: Yes. A quarter is three twelfths, a sixth is two twelfths, so the answer is five twelfths. With \
twenty-fourths you'd get ten twenty-fourths, which simplifies to the same thing.
Student: So both ways work, one is just tidier.
Teacher: That's it. Try these three: two fifths plus one tenth, three quarters plus two thirds, and one \
eighth plus five twelfths. Tell me what size of piece you chose for each one.
Student: Okay. Can I draw them?
Teacher: Please do. Drawing them is how you'll remember it."""),
    Prompt("dialogue", "Support call about a router", """\
Agent: Thanks for calling, this is Ravi. How can I help today?
Caller: Hi. My internet keeps dropping, maybe five or six times an evening. It comes back after a minute.
Agent: I'm sorry about that. Can I take the account number or the postcode?
Caller: It's the postcode, KT4 9PL, and the name's Helen Moss.
Agent: Thank you, Helen. I can see the line. Does it drop on every device, or only on some?
Caller: Everything. The television stops streaming and my laptop loses the connection at the same time.
Agent: Okay. When it drops, what do the lights on the router do?
Caller: The one with the globe turns orange and flashes, then goes white again.
Agent: That tells me the router is losing the connection to our network, not just the Wi-Fi in the house. \
I'm running a line test now. It takes about a minute.
Caller: Sure.
Agent: Right, the test shows the line resynchronised nine times since yesterday, and the noise level is \
higher than it should be. Is the router plugged into the main socket where the line comes into the house, \
or into an extension?
Caller: There's an extension cable. The router's in the living room, the socket is in the hall.
Agent: Extension cables are a common cause of this. Could you try plugging the router straight into the main \
socket for a day or two, even if it's inconvenient?
Caller: I can put it on the hall table, I suppose.
Agent: Also check whether the socket has a filter on it, a small white box with two outputs. If the phone \
and router share a socket without one, that can cause noise too.
Caller: There's no phone any more, just the router.
Agent: That's fine then. I'll keep the line under monitoring for forty-eight hours. If it still drops with \
the router on the main socket, we'll send an engineer, and there won't be a charge as long as the \
fault is on \
our side.
Caller: Okay. Do I need to call back?
Agent: No, we'll text you the result of the monitoring. Your reference number is 4471 3308. Anything else I \
can help with?
Caller: No, that's everything. Thank you.
Agent: Thanks, Helen. Have a good evening."""),
]

_LISTS = [
    Prompt("list", "Growing tomatoes in pots", """\
How to grow tomatoes in pots

You will need:
- a pot at least 30 cm wide and 30 cm deep, with drainage holes
- peat-free multipurpose compost
- one young tomato plant, about 15 to 20 cm tall
- a bamboo cane 1.5 m long and some soft string
- liquid tomato feed

Steps:
1. Wait until there is no longer any risk of frost. Tomatoes are damaged by temperatures below about 5 \
degrees Celsius.
2. Choose the sunniest, most sheltered spot you have. Tomatoes need at least six hours of direct sun a day.
3. Fill the pot with compost to about 5 cm below the rim and water it so it is evenly moist.
4. Plant the tomato deeper than it sat in its original pot, burying the lowest part of the stem. It will \
grow extra roots from the buried stem.
5. Push the cane in near the stem, taking care not to spear the root ball, and tie the stem to it loosely \
with a figure-of-eight loop of string.
6. Water thoroughly after planting.
7. As the plant grows, keep tying the stem to the cane every 20 cm or so.
8. For tall varieties, pinch out the side shoots that appear between the main stem and the leaf stalks. Do \
this while they are small, with your finger and thumb.
9. Water regularly so the compost never dries out completely. Irregular watering causes the fruit \
to split and \
can cause dark patches at the bottom of the fruit.
10. Once the first tiny fruits have formed, feed once a week with tomato feed, following the instructions on \
the bottle.
11. When the plant has four or five trusses of fruit, or reaches the top of the cane, pinch out the growing \
tip so the plant puts its energy into ripening what it has.
12. Pick the fruit when it is fully coloured and comes away easily.

Common problems:
- Yellow lower leaves: usually normal ageing; remove them.
- Curled leaves: often a response to hot days or cold nights, rarely serious.
- White flies under the leaves: hang a yellow sticky trap nearby and check the plant daily.
- Fruit not ripening in autumn: pick green fruit and keep it indoors with a ripe banana."""),
    Prompt("list", "Packing list for a weekend camping trip", """\
Packing list: two nights, car camping, spring weather

Shelter and sleep
- tent, with pegs, poles and guy lines (check all are in the bag)
- groundsheet or footprint
- sleeping bag rated to at least 2 degrees Celsius
- sleeping mat, and the repair kit if it is inflatable
- small pillow, or a stuff sack to fill with clothes

Cooking and food
- stove and two gas canisters
- lighter and a box of matches in a plastic bag
- one pot, one pan, lid that works as a plate
- two mugs, two bowls, two sets of cutlery, one sharp knife
- chopping board, washing-up sponge, biodegradable soap, tea towel
- water containers for at least 10 litres
- cool box with ice packs frozen the night before
- food: breakfasts, lunches and dinners planned, plus one spare meal
- coffee, tea, sugar, salt, pepper, cooking oil in a small bottle

Clothes
- waterproof jacket and trousers
- warm fleece or insulated jacket for the evenings
- two base layers, one to sleep in
- walking trousers and one pair of shorts
- socks for every day plus one pair
- hat and gloves: spring nights can still be cold
- comfortable shoes for the campsite as well as walking boots

Health and safety
- first aid kit: plasters, blister pads, bandage, painkillers, antiseptic wipes
- any regular medicines
- sun cream and insect repellent
- head torch for each person, with spare batteries
- paper map of the area and a compass

Other
- camping chairs
- rubbish bags: take everything home
- power bank for phones
- book or cards for rainy evenings
- mallet for the pegs
- small towel each

Before leaving
- check the weather forecast again
- tell someone where you are going and when you will be back
- confirm the campsite booking and arrival time
- pitch the tent in the garden if it has not been used for a year"""),
    Prompt("list", "Changing a flat tyre", """\
How to change a flat tyre safely

Before you start
1. Pull over as far from the traffic as you can, on firm, level ground. Do not stop on a bend or just over \
the top of a hill.
2. Switch on the hazard warning lights, apply the handbrake and put the car in first gear or park.
3. Get all passengers out of the car and away from the road, behind a barrier if there is one.
4. If it is safe to do so, place a warning triangle on the same side of the road, about 45 metres behind the \
car. Never do this on a motorway.
5. Find the spare wheel, the jack and the wheel brace. They are usually under the floor of the boot. Check \
the handbook for the correct jacking points.

Changing the wheel
6. Remove the wheel trim if there is one.
7. Loosen each wheel nut about half a turn with the brace while the wheel is still on the ground. Turn \
anticlockwise. Do not remove them yet.
8. Place the jack under the jacking point nearest the flat tyre and raise the car until the tyre is about \
5 cm off the ground.
9. Remove the wheel nuts completely and keep them together where they cannot roll away.
10. Pull the wheel straight towards you and lay it flat, so it cannot roll.
11. Lift the spare wheel onto the studs, lining up the holes.
12. Put the nuts back on and tighten them by hand.
13. Lower the car until the tyre touches the ground, then remove the jack.
14. Tighten the nuts fully with the brace, working in a diagonal pattern rather than going round the \
circle.

Afterwards
15. Put the flat wheel, the jack and the tools back in the boot.
16. Check the pressure of the spare at the first opportunity. Spares often sit for years without attention.
17. If the spare is a thin space-saver wheel, do not drive faster than the speed printed on it, usually 80 \
km per hour, and replace it with a full-size wheel as soon as you can.
18. Have the wheel nuts checked for tightness after about 50 km.
19. Take the damaged tyre to be repaired or replaced. A puncture in the sidewall cannot be repaired \
safely."""),
    Prompt("list", "Moving house checklist", """\
Moving house: a checklist by week

Eight weeks before
- Decide on a moving date and confirm it with your landlord or buyer.
- Get quotes from at least three removal firms, or book a van and ask friends to help.
- Start clearing out: sell, donate or recycle anything you would not buy again.
- Measure large furniture and check that it will fit through the doors at the new place.

Four weeks before
- Book the removal firm or van and confirm the hours.
- Collect boxes, tape, marker pens and padding. Newspaper marks some surfaces, so use paper for dishes.
- Start packing rooms you rarely use, such as the loft, spare room and garage.
- Arrange parking for the van at both addresses if the street is busy.

Two weeks before
- Tell your bank, employer, doctor, dentist and insurance companies your new address.
- Register to vote at the new address and update your driving licence.
- Set up mail forwarding for at least three months.
- Arrange for gas, electricity, water and internet at the new home, and give notice at the old one.
- Use up food from the freezer.

One week before
- Pack everything except what you need daily.
- Label every box with its room and a short list of contents. Number the boxes and keep a list.
- Pack a first-night box: kettle, mugs, tea, phone chargers, toilet paper, towels, bedding, basic tools, \
medicines and a change of clothes.
- Defrost the freezer the day before the move.

Moving day
- Take meter readings at both properties and photograph them.
- Walk round the old home once it is empty: check cupboards, the loft and the garden shed.
- Keep valuables, documents and keys with you, not in the van.
- At the new home, put beds together first so that everyone can sleep, whatever else is unfinished.

After the move
- Check smoke alarms and find the stopcock and the fuse box.
- Register with a new doctor if you have moved out of the area.
- Unpack the kitchen and bathroom first.
- Flatten boxes and offer them to someone else who is moving."""),
    Prompt("list", "Red lentil soup", """\
Red lentil and carrot soup (serves 4)

Ingredients
- 1 tablespoon olive oil
- 1 large onion, chopped
- 2 cloves of garlic, sliced
- 3 medium carrots, peeled and diced
- 1 teaspoon ground cumin
- half a teaspoon of smoked paprika
- 200 g red lentils, rinsed
- 1.2 litres of vegetable stock
- 1 tin of chopped tomatoes (400 g)
- juice of half a lemon
- salt and black pepper
- a small bunch of coriander or parsley, to serve

Method
1. Heat the oil in a large saucepan over a medium heat.
2. Add the onion with a pinch of salt and cook for 8 to 10 minutes, stirring now and then, until soft and \
golden at the edges.
3. Add the garlic and carrots and cook for another 3 minutes.
4. Stir in the cumin and paprika and cook for 1 minute, until fragrant. Do not let the spices burn, or the \
soup will taste bitter.
5. Add the lentils, stock and tomatoes. Bring to the boil, then reduce the heat and simmer with the lid \
partly on for about 25 minutes, until the lentils have collapsed and the carrots are tender.
6. Stir from time to time, scraping the bottom of the pan, because lentils tend to stick as they thicken.
7. Blend the soup until smooth, or blend only half of it if you like some texture.
8. If it is too thick, add a little hot water until it is the consistency you want.
9. Stir in the lemon juice and season with salt and pepper. Taste and adjust: lemon brightens the flavour \
and is worth adding even if it seems unusual.
10. Serve with chopped herbs scattered on top and bread on the side.

Tips
- Red lentils do not need soaking; rinse them until the water runs almost clear.
- The soup thickens as it cools. When reheating, add water and check the seasoning again.
- It keeps for 4 days in the fridge and freezes well for up to 3 months.
- For a richer version, stir in 100 ml of coconut milk at the end instead of some of the stock.
- A spoonful of yoghurt and a pinch of chilli flakes on each bowl adds contrast."""),
]

_BY_CATEGORY = {"prose": _PROSE, "code": _CODE, "numbers": _NUMBERS, "dialogue": _DIALOGUE, "list": _LISTS}


def builtin_documents() -> list[Prompt]:
    """All built-in documents, interleaved by category (prose, code, numbers, dialogue, list, prose, ...).

    Interleaving keeps every category represented when ``max_tokens`` cuts the set short.
    """
    pools = [list(_BY_CATEGORY[c]) for c in CATEGORIES]
    out: list[Prompt] = []
    while any(pools):
        for pool in pools:
            if pool:
                out.append(pool.pop(0))
    return out


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of all special tokens: the named ones and every added token marked special."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return ids


def ordinary_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of the vocabulary without special tokens, ascending.  # [n_ordinary] long"""
    special = special_token_ids(tokenizer)
    keep = [i for i in range(len(tokenizer)) if i not in special]
    return torch.tensor(keep, dtype=torch.long)


def random_token_sequences(tokenizer: Any, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` sequences of ``length`` tokens drawn uniformly (with replacement) from the ordinary vocabulary.

    Gu et al. 2024 (Sec. 3): sink rates on random-token inputs. Seeded with a private generator, so the
    result depends only on the tokenizer, ``n``, ``length`` and ``seed``.
    """
    pool = ordinary_token_ids(tokenizer)  # [n_ordinary]
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, len(pool), (n, length), generator=gen)  # [n, length]
    return pool[idx].tolist()


def repeated_token_ids(tokenizer: Any, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct ordinary tokens to repeat: common words that are one token, then seeded random ids."""
    special = special_token_ids(tokenizer)
    candidates: list[int] = []
    for word in REPEAT_CANDIDATES:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and int(ids[0]) not in special and int(ids[0]) not in candidates:
            candidates.append(int(ids[0]))
    gen = torch.Generator().manual_seed(int(seed) + 1)
    order = torch.randperm(len(candidates), generator=gen).tolist()
    chosen = [candidates[i] for i in order][:n]
    if len(chosen) < n:
        pool = [i for i in ordinary_token_ids(tokenizer).tolist() if i not in chosen]
        extra = torch.randperm(len(pool), generator=gen)[: n - len(chosen)].tolist()
        chosen += [pool[i] for i in extra]
    return chosen


def repeated_token_sequences(tokenizer: Any, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` sequences, each one ordinary token repeated ``length`` times (Gu et al. 2024, Sec. 3)."""
    return [[tok] * length for tok in repeated_token_ids(tokenizer, n, seed)]


def control_sequences(
    tokenizer: Any, n_each: int, text_len: int, *, seed: int = 0,
    prefix: Sequence[int] = (), suffix: Sequence[int] = (),
) -> list[tuple[str, list[int]]]:
    """(category, ids) for ``n_each`` random-token and ``n_each`` repeated-token controls.

    The body holds ``text_len`` tokens and is framed by the same specials as text windows (BOS, or
    [CLS] ... [SEP]), so controls and text differ only in their content.
    """
    out: list[tuple[str, list[int]]] = []
    for body in random_token_sequences(tokenizer, n_each, text_len, seed):
        out.append(("random", [*prefix, *body, *suffix]))
    for body in repeated_token_sequences(tokenizer, n_each, text_len, seed):
        out.append(("repeated", [*prefix, *body, *suffix]))
    return out
