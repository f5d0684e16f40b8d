//! Our R2F and R2F+ prompt templates, written from the method's description. Changing any text
//! here must bump `TEMPLATE_VERSION`: it is part of the plan-cache key.

pub const TEMPLATE_VERSION: &str = "r2f-tpl-1";

pub const R2F_SYSTEM: &str = "You help a text-to-image model that draws rare concept \
compositions badly, such as objects with properties they never have in reality. For each rare \
concept in a prompt you name a related but frequent concept the model knows well (a parent \
concept or an umbrella term that keeps the unusual property), so that the frequent concept can \
guide the early, coarse steps of the drawing before the rare concept takes over.";

pub const R2F_USER: &str = r#"Work through these steps for the input prompt:
a. List the rare concepts of the prompt (compositions unlikely to be seen in reality). Concepts must not overlap. If there is none, list nothing.
b. For each rare concept, name its main noun and its context, and replace the main noun by a more frequent noun that fits the context and keeps the noun's visible properties.
c. Write the frequent text and the rare text of the concept, separated by " BREAK ".
d. Rate from 1 to 5 how much fine local visual detail the rare concept needs to be drawn right (1: hardly any, 5: the local details are essential), with a short reason.

Answer in exactly this format, one item per line:
### Num Rare Concepts: <number>
a. Rare concept: <span of the prompt>
b. <reason>. Main noun subject: <noun>, Context: <context>, Replaced frequent subject: <frequent noun>
c. <frequent span> BREAK <rare span>
d. <reason>. Visual Detail Level: <1-5>
(repeat a-d for every rare concept, with a line holding only AND between two concepts)
### Visual Detail Level: <level of concept 1> AND <level of concept 2> ...
### Final Prompt Sequence: <frequent span 1> BREAK <rare span 1> AND <frequent span 2> BREAK <rare span 2> ...

Examples:

### Input: a furry turtle
### Output:
### Num Rare Concepts: 1
a. Rare concept: a furry turtle
b. Turtles have shells, not fur. Main noun subject: turtle, Context: furry, Replaced frequent subject: animal
c. a furry animal BREAK a furry turtle
d. Fur is a fine local texture that must cover the whole body. Visual Detail Level: 5
### Visual Detail Level: 5
### Final Prompt Sequence: a furry animal BREAK a furry turtle

### Input: a cube shaped watermelon
### Output:
### Num Rare Concepts: 1
a. Rare concept: a cube shaped watermelon
b. Watermelons are round. Main noun subject: watermelon, Context: cube shaped, Replaced frequent subject: green object
c. a cube shaped green object BREAK a cube shaped watermelon
d. The overall shape matters more than small details. Visual Detail Level: 1
### Visual Detail Level: 1
### Final Prompt Sequence: a cube shaped green object BREAK a cube shaped watermelon

### Input: a cat sleeping on a sofa
### Output:
### Num Rare Concepts: 0
No rare concept was found in the given input text.
### Visual Detail Level: 0
### Final Prompt Sequence: a cat sleeping on a sofa

### Input: a spiky rabbit and a glass owl
### Output:
### Num Rare Concepts: 2
a. Rare concept: a spiky rabbit
b. Rabbits are soft, not spiky. Main noun subject: rabbit, Context: spiky, Replaced frequent subject: animal
c. a spiky animal BREAK a spiky rabbit
d. Spikes are local details spread over the body. Visual Detail Level: 4
AND
a. Rare concept: a glass owl
b. Owls are not made of glass. Main noun subject: owl, Context: glass, Replaced frequent subject: bird figurine
c. a glass bird figurine BREAK a glass owl
d. The material shows on the whole surface, the shape stays simple. Visual Detail Level: 3
### Visual Detail Level: 4 AND 3
### Final Prompt Sequence: a spiky animal BREAK a spiky rabbit AND a glass bird figurine BREAK a glass owl

### Input: a giraffe made of lego bricks, a rainbow striped penguin and a dog
### Output:
### Num Rare Concepts: 2
a. Rare concept: a giraffe made of lego bricks
b. Giraffes are animals, not toy builds. Main noun subject: giraffe, Context: made of lego bricks, Replaced frequent subject: tall figure
c. a tall figure made of lego bricks BREAK a giraffe made of lego bricks
d. The bricks are small repeated details. Visual Detail Level: 4
AND
a. Rare concept: a rainbow striped penguin
b. Penguins are black and white. Main noun subject: penguin, Context: rainbow striped, Replaced frequent subject: bird
c. a rainbow striped bird BREAK a rainbow striped penguin
d. Stripes are a mid-scale pattern. Visual Detail Level: 2
### Visual Detail Level: 4 AND 2
### Final Prompt Sequence: a tall figure made of lego bricks BREAK a giraffe made of lego bricks AND a rainbow striped bird BREAK a rainbow striped penguin

### Input: {PROMPT}
### Output:"#;

pub const R2FPLUS_SYSTEM: &str = "You help a text-to-image model lay out images of rare \
concept compositions. You answer with one JSON object only, as plain text: no code block, no \
comment.";

pub const R2FPLUS_USER: &str = r##"For the prompt below:
1. List the objects it mentions and key them "#1", "#2", ... (each instance of a repeated object gets its own key).
2. Write "base_prompt": the prompt with each object replaced by its key (repeated objects joined with "and").
3. For each object write "prompt": a short prompt that contains exactly its own key once, and "object": the object's words from the prompt.
4. Give each object a "bbox" [x_min, y_min, x_max, y_max] with values in [0, 1]: inside the image, balanced and centred, separate objects not overlapping, no side shorter than 0.2.
5. If the object is a rare concept, give "r2f": a list of frequent concepts from general to specific (usually one is enough), else an empty list.
6. Give "visual_detail_levels": one level from 1 to 5 per entry of "r2f", not decreasing (how much fine local detail the rare concept needs).
Answer with a JSON object with the keys "original_prompt", "base_prompt" and "objects" (keyed "#1", "#2", ...; each with "prompt", "object", "r2f", "visual_detail_levels", "bbox").

Example:
Original prompt: "a glass crocodile next to a pigeon"
Output: {"original_prompt": "a glass crocodile next to a pigeon", "base_prompt": "#1 next to #2", "objects": {"#1": {"prompt": "a photo of #1", "object": "a glass crocodile", "r2f": ["an animal made of glass"], "visual_detail_levels": [3], "bbox": [0.05, 0.35, 0.5, 0.75]}, "#2": {"prompt": "a photo of #2", "object": "a pigeon", "r2f": [], "visual_detail_levels": [], "bbox": [0.6, 0.4, 0.9, 0.75]}}}

Original prompt: "{PROMPT}"
Output:"##;

/// The R2F user message for a prompt.
pub fn r2f_user(prompt: &str) -> String {
    R2F_USER.replace("{PROMPT}", prompt)
}

pub fn r2fplus_user(prompt: &str) -> String {
    R2FPLUS_USER.replace("{PROMPT}", prompt)
}
