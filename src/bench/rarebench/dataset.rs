//! The benchmark folder in the official layout (the `test/` tree of the R2F repository):
//!
//! - prompts: `test/original_prompt/rarebench/rarebench_<category>.txt`, one prompt a line,
//!   UTF-8, usually without a final newline; lines may carry trailing spaces and non-ASCII
//!   characters (curly apostrophes);
//! - R2F plans (optional): `test/r2f_prompt/rarebench/rarebench_<category>_gpt4.txt`, JSON
//!   despite the extension, `{prompt: {"visual_detail_level": "4" | ["3", "5"],
//!   "r2f_prompt": [[p0, ..., pK]]}}`; levels may be a string or a list and unsorted, plans may
//!   hold the rare prompt alone, and a key may differ from its prompt line by surrounding spaces;
//! - R2F+ plans (optional, multi categories): `test/r2fplus_prompt/rarebench/rarebench_<category>_gpt4o.txt`,
//!   `{prompt: {original_prompt, base_prompt, objects: {"#k": {...}}}}`, not every prompt present.
//!
//! Plans are read into the crate's own types with [`Plan::from_json`] (its validation included):
//! a plan the workers would refuse is an error naming the file and the prompt, not a surprise
//! in the middle of a run.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::spec::Category;
use crate::plan::{Plan, R2fPlan, RegionPlan};

/// The prompt files' folder, relative to the benchmark root.
pub const PROMPT_DIR: &str = "test/original_prompt/rarebench";
/// The R2F plan files' folder.
pub const R2F_DIR: &str = "test/r2f_prompt/rarebench";
/// The R2F+ plan files' folder.
pub const R2FPLUS_DIR: &str = "test/r2fplus_prompt/rarebench";

/// The prompt file of a category.
pub fn prompt_file(root: &Path, c: Category) -> PathBuf {
    root.join(PROMPT_DIR).join(format!("{}.txt", c.dataset()))
}

/// The R2F plan file of a category.
pub fn r2f_plan_file(root: &Path, c: Category) -> PathBuf {
    root.join(R2F_DIR).join(format!("{}_gpt4.txt", c.dataset()))
}

/// The R2F+ plan file of a category (the multi categories have one).
pub fn r2fplus_plan_file(root: &Path, c: Category) -> Option<PathBuf> {
    c.is_multi().then(|| {
        root.join(R2FPLUS_DIR)
            .join(format!("{}_gpt4o.txt", c.dataset()))
    })
}

/// One prompt of a category and its precomputed plans.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// The 0-based line of the prompt file.
    pub index: usize,
    /// The line as the file has it (trailing spaces kept).
    pub line: String,
    pub r2f: Option<R2fPlan>,
    pub r2fplus: Option<RegionPlan>,
}

impl PromptItem {
    /// The prompt images are made from and judged against: the line without surrounding spaces.
    pub fn prompt(&self) -> &str {
        self.line.trim()
    }

    /// The precomputed plan of a mode's kind, if the folder has one.
    pub fn plan_for(&self, mode: crate::generate::JobMode) -> Option<Plan> {
        use crate::generate::JobMode;
        match mode {
            JobMode::Plain => None,
            JobMode::R2f => self.r2f.clone().map(Plan::R2f),
            JobMode::R2fplus => self.r2fplus.clone().map(Plan::Regions),
        }
    }
}

/// A category's prompts.
#[derive(Debug, Clone)]
pub struct CategoryData {
    pub category: Category,
    pub prompts: Vec<PromptItem>,
    /// The plan files read (those present).
    pub r2f_file: Option<PathBuf>,
    pub r2fplus_file: Option<PathBuf>,
    /// Keys of the plan files that match no prompt line (reported, not fatal).
    pub unmatched_plans: Vec<String>,
}

impl CategoryData {
    /// Prompts with an R2F plan / an R2F+ plan.
    pub fn plan_counts(&self) -> (usize, usize) {
        (
            self.prompts.iter().filter(|p| p.r2f.is_some()).count(),
            self.prompts.iter().filter(|p| p.r2fplus.is_some()).count(),
        )
    }
}

/// The benchmark as read from a folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub categories: Vec<CategoryData>,
}

impl Dataset {
    /// Reads `categories` (in that order) from the folder `root`. A missing prompt file is an
    /// error; missing plan files are not (configurations that need them say so when they run).
    pub fn load(root: &Path, categories: &[Category]) -> Result<Self, String> {
        if !root.is_dir() {
            return Err(format!(
                "the RareBench folder {} does not exist",
                root.display()
            ));
        }
        let categories = categories
            .iter()
            .map(|&c| load_category(root, c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            root: root.to_path_buf(),
            categories,
        })
    }

    pub fn category(&self, c: Category) -> Option<&CategoryData> {
        self.categories.iter().find(|d| d.category == c)
    }

    /// Prompts over all categories read.
    pub fn len(&self) -> usize {
        self.categories.iter().map(|c| c.prompts.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read_text(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|e| format!("{} is not UTF-8: {e}", path.display()))?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(&text).to_string())
}

/// The prompt lines of a prompt file: split on `\n` (a `\r` before it dropped), a final newline
/// allowed; an empty line elsewhere is an error (it would shift every later index).
pub fn parse_prompt_lines(text: &str, what: &str) -> Result<Vec<String>, String> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let l = l.strip_suffix('\r').unwrap_or(l);
            if l.trim().is_empty() {
                Err(format!("{what}: line {} is empty", i + 1))
            } else {
                Ok(l.to_string())
            }
        })
        .collect()
}

/// A plan file's entries, by key in file order.
fn read_plan_file(path: &Path) -> Result<Map<String, Value>, String> {
    let text = read_text(path)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(format!(
            "{} must hold a JSON object of prompt -> plan",
            path.display()
        )),
        Err(e) => Err(format!("{} is not JSON: {e}", path.display())),
    }
}

/// The key of `entries` that belongs to the prompt line: the line itself, else the one key that
/// equals it without surrounding spaces.
fn match_key<'a>(
    entries: &'a Map<String, Value>,
    line: &str,
    path: &Path,
) -> Result<Option<&'a str>, String> {
    if let Some((k, _)) = entries.get_key_value(line) {
        return Ok(Some(k.as_str()));
    }
    let want = line.trim();
    let mut found = entries.keys().filter(|k| k.trim() == want);
    match (found.next(), found.next()) {
        (None, _) => Ok(None),
        (Some(k), None) => Ok(Some(k.as_str())),
        (Some(_), Some(_)) => Err(format!(
            "{}: several plans match the prompt `{want}` up to surrounding spaces",
            path.display()
        )),
    }
}

/// Reads the plans of one file for the lines; returns them and the keys no line took.
fn plans_for<T>(
    path: &Path,
    lines: &[String],
    take: impl Fn(Plan) -> Option<T>,
    kind: &str,
) -> Result<(Vec<Option<T>>, Vec<String>), String> {
    let entries = read_plan_file(path)?;
    let mut used = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        let Some(key) = match_key(&entries, line, path)? else {
            out.push(None);
            continue;
        };
        used.insert(key.to_string());
        let plan = Plan::from_json(&entries[key]).map_err(|e| {
            format!(
                "{}: the plan of `{}` is not a valid {kind} plan: {e}",
                path.display(),
                key.trim()
            )
        })?;
        let plan = take(plan).ok_or_else(|| {
            format!(
                "{}: the plan of `{}` is not an {kind} plan",
                path.display(),
                key.trim()
            )
        })?;
        out.push(Some(plan));
    }
    let unmatched = entries
        .keys()
        .filter(|k| !used.contains(k.as_str()))
        .cloned()
        .collect();
    Ok((out, unmatched))
}

fn load_category(root: &Path, c: Category) -> Result<CategoryData, String> {
    let path = prompt_file(root, c);
    let lines = parse_prompt_lines(&read_text(&path)?, &path.display().to_string())?;
    let mut unmatched_plans = Vec::new();
    let r2f_path = r2f_plan_file(root, c);
    let (r2f, r2f_file) = if r2f_path.is_file() {
        let (plans, unmatched) = plans_for(
            &r2f_path,
            &lines,
            |p| match p {
                Plan::R2f(p) => Some(p),
                Plan::Regions(_) => None,
            },
            "R2F",
        )?;
        unmatched_plans.extend(unmatched);
        (plans, Some(r2f_path))
    } else {
        (vec![None; lines.len()], None)
    };
    let (r2fplus, r2fplus_file) = match r2fplus_plan_file(root, c).filter(|p| p.is_file()) {
        Some(path) => {
            let (plans, unmatched) = plans_for(
                &path,
                &lines,
                |p| match p {
                    Plan::Regions(p) => Some(p),
                    Plan::R2f(_) => None,
                },
                "R2F+",
            )?;
            unmatched_plans.extend(unmatched);
            (plans, Some(path))
        }
        None => (vec![None; lines.len()], None),
    };
    let prompts = lines
        .into_iter()
        .zip(r2f.into_iter().zip(r2fplus))
        .enumerate()
        .map(|(index, (line, (r2f, r2fplus)))| PromptItem {
            index,
            line,
            r2f,
            r2fplus,
        })
        .collect();
    Ok(CategoryData {
        category: c,
        prompts,
        r2f_file,
        r2fplus_file,
        unmatched_plans,
    })
}

#[cfg(test)]
#[path = "dataset_tests.rs"]
mod tests;
