//! One scenario, end to end, as `run` does it: bring it up ([`Session::up`]), run every
//! probe, report, take it down. On failure the agent's log tail is printed.
use crate::error::SetupError;
use crate::report::ScenarioReport;
use crate::scenario::Plan;
use crate::session::Session;
pub use crate::session::{RunNames, RunOptions};

/// Runs one scenario. `Err` means it could not be set up or checked (exit code 2).
pub async fn run_scenario(plan: &Plan, opts: &RunOptions, names: &RunNames) -> Result<ScenarioReport, SetupError> {
    let session = Session::up(plan, opts, names).await?;
    let report = session.probe_all().await;
    if !report.ok() {
        session.print_agent_log_tail();
    }
    session.down().await;
    Ok(report)
}
