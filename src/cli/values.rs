//! The command line's closed sets: clap value enums for the types the library defines
//! elsewhere, so that `--help` lists the choices and a wrong value is a clap error naming the
//! possible values.

use clap::builder::PossibleValue;
use clap::ValueEnum;

use crate::models::hub::Family;
use crate::service::planner::PlanMode;

/// `r2f plan --mode`: `r2f` or `r2fplus`.
impl ValueEnum for PlanMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[PlanMode::R2f, PlanMode::R2fPlus]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}

/// `r2f schedule --model`: `sd3` or `sdxl`.
impl ValueEnum for Family {
    fn value_variants<'a>() -> &'a [Self] {
        &[Family::Sd3, Family::Sdxl]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}
