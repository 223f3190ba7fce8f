//! Reads summary CSVs back: a Markdown table of the headline numbers (for `results/README.md`)
//! and a grouped bar chart of several targets on the same workloads.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::PathBuf;

use clap::Args;
use thiserror::Error;

use crate::plot::{self, Bar, PlotError};

#[derive(Args, Clone, Debug)]
pub struct CompareArgs {
    /// Summary CSV files to read (as written by a run's --summary / OUT/summary.csv).
    #[arg(long, required = true, num_args = 1..)]
    pub summary: Vec<PathBuf>,
    /// Also draw throughput and p99 latency bars per workload, one colour per target.
    #[arg(long, value_name = "PNG")]
    pub plot: Option<PathBuf>,
    /// Title of the plot.
    #[arg(long, default_value = "throughput and p99 latency by workload")]
    pub title: String,
}

#[derive(Debug, Error)]
pub enum CompareError {
    #[error("{path}: {source}")]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error("{path}: no column {column}; is it a replikv-loadgen summary?")]
    MissingColumn { path: PathBuf, column: &'static str },
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// One summary row, reduced to what a comparison shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The workload, named by `label` when the run had one.
    pub group: String,
    pub target: String,
    pub servers: String,
    pub clients: String,
    pub workload: String,
    pub read_ratio: String,
    pub ops_per_s: f64,
    pub p50_us: String,
    pub p99_us: String,
    pub p999_us: String,
    pub errors: String,
}

const COLUMNS: [&str; 12] = [
    "label",
    "target",
    "servers",
    "clients",
    "workload",
    "read_ratio",
    "all_ops_per_s",
    "all_p50_us",
    "all_p99_us",
    "all_p999_us",
    "errors",
    "sync",
];

/// Reads every row of the given summary files, in file order.
pub fn read_rows(paths: &[PathBuf]) -> Result<Vec<Row>, CompareError> {
    let mut rows = Vec::new();
    for path in paths {
        let csv_err = |source| CompareError::Csv {
            path: path.clone(),
            source,
        };
        let mut reader = csv::Reader::from_path(path).map_err(csv_err)?;
        let headers = reader.headers().map_err(csv_err)?.clone();
        let mut index = HashMap::new();
        for column in COLUMNS {
            let i =
                headers
                    .iter()
                    .position(|h| h == column)
                    .ok_or(CompareError::MissingColumn {
                        path: path.clone(),
                        column,
                    })?;
            index.insert(column, i);
        }
        for record in reader.records() {
            let record = record.map_err(csv_err)?;
            let field = |c: &str| record.get(index[c]).unwrap_or_default().to_string();
            let read_ratio = field("read_ratio");
            let label = field("label");
            let group = if label.is_empty() {
                let gets = read_ratio.parse::<f64>().unwrap_or(0.0) * 100.0;
                format!(
                    "{} {gets:.0}% gets, {} clients",
                    field("workload"),
                    field("clients")
                )
            } else {
                label
            };
            let sync = field("sync");
            let target = if sync.is_empty() {
                field("target")
            } else {
                format!("{} (sync {sync})", field("target"))
            };
            rows.push(Row {
                group,
                target,
                servers: field("servers"),
                clients: field("clients"),
                workload: field("workload"),
                read_ratio,
                ops_per_s: field("all_ops_per_s").parse().unwrap_or(0.0),
                p50_us: field("all_p50_us"),
                p99_us: field("all_p99_us"),
                p999_us: field("all_p999_us"),
                errors: field("errors"),
            });
        }
    }
    Ok(rows)
}

/// A Markdown table with one line per row.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| run | target | servers | clients | workload | gets | ops/s | p50 µs | p99 µs | p99.9 µs | errors |\n\
         |---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let gets = r.read_ratio.parse::<f64>().unwrap_or(0.0) * 100.0;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {gets:.0}% | {:.0} | {} | {} | {} | {} |",
            r.group,
            r.target,
            r.servers,
            r.clients,
            r.workload,
            r.ops_per_s,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.errors
        );
    }
    out
}

/// Prints the table and draws the plot if asked.
pub fn run(args: &CompareArgs) -> Result<String, CompareError> {
    let rows = read_rows(&args.summary)?;
    if let Some(path) = &args.plot {
        let bars = |value: &dyn Fn(&Row) -> f64| -> Vec<Bar> {
            rows.iter()
                .map(|r| Bar {
                    group: r.group.clone(),
                    series: r.target.clone(),
                    value: value(r),
                })
                .collect()
        };
        let panels = [
            ("operations per second", bars(&|r| r.ops_per_s)),
            (
                "p99 latency (µs)",
                bars(&|r| r.p99_us.parse().unwrap_or(0.0)),
            ),
        ];
        plot::plot_comparison(path, &args.title, &panels)?;
    }
    Ok(markdown_table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn reads_rows_by_column_name_and_tabulates_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        fs::write(
            &path,
            "run_id,label,target,servers,clients,workload,read_ratio,all_ops_per_s,all_p50_us,all_p99_us,all_p999_us,errors,sync,extra\n\
             a,put-64,replikv,3,64,uniform,0,1234.5,800,2000,3000,0,always,x\n\
             b,,etcd,3,1,uniform,1,99.9,100,200,300,2,,y\n",
        )
        .unwrap();
        let rows = read_rows(std::slice::from_ref(&path)).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].group, "put-64");
        assert_eq!(rows[0].target, "replikv (sync always)");
        assert_eq!(rows[1].group, "uniform 100% gets, 1 clients");
        assert_eq!(rows[1].target, "etcd");
        let table = markdown_table(&rows);
        assert!(table.contains("| put-64 | replikv (sync always) | 3 | 64 | uniform | 0% | 1234 | 800 | 2000 | 3000 | 0 |"), "{table}");

        let png = dir.path().join("c.png");
        run(&CompareArgs {
            summary: vec![path],
            plot: Some(png.clone()),
            title: "t".into(),
        })
        .unwrap();
        assert!(fs::metadata(png).unwrap().len() > 1000);
    }

    #[test]
    fn a_foreign_csv_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        fs::write(&path, "a,b\n1,2\n").unwrap();
        assert!(matches!(
            read_rows(&[path]),
            Err(CompareError::MissingColumn { .. })
        ));
    }
}
