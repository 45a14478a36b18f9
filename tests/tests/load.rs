//! End-to-end: load. Sixteen clients each running four jobs at once all succeed, and each
//! output belongs to its own request: its metadata names its own prompt and seed, and its
//! pixels equal those of the same request run alone.

use std::path::{Path, PathBuf};

use dw_tests::{example_workflow, png_pixels, png_text_chunks, TestDaemon};

const CLIENTS: usize = 16;
const RUNS_EACH: usize = 4;

fn request(client: usize, run: usize) -> (String, String) {
    (
        format!("prompt=client {client} run {run}"),
        format!("seed={}", 1000 + client * 10 + run),
    )
}

fn run_one(daemon: &TestDaemon, out: &Path, client: usize, run: usize) -> PathBuf {
    let (prompt, seed) = request(client, run);
    let workflow = example_workflow();
    let result = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        &prompt,
        &seed,
        "num_inference_steps=1",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    result.assert_code(0);
    PathBuf::from(result.json()["outputs"][0]["path"].as_str().unwrap())
}

#[test]
fn sixteen_clients_with_four_runs_each_all_get_their_own_correct_outputs() {
    let daemon = TestDaemon::new();
    let alone = daemon.dir.path().join("alone");
    let references: Vec<((usize, usize), Vec<u8>)> = [(0, 0), (7, 2), (15, 3)]
        .into_iter()
        .map(|(c, r)| {
            (
                (c, r),
                png_pixels(&run_one(&daemon, &alone.join(format!("{c}-{r}")), c, r)).2,
            )
        })
        .collect();

    let outputs: Vec<Vec<PathBuf>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let daemon = &daemon;
                scope.spawn(move || {
                    (0..RUNS_EACH)
                        .map(|run| {
                            run_one(
                                daemon,
                                &daemon.dir.path().join(format!("load/{client}/{run}")),
                                client,
                                run,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread"))
            .collect()
    });

    for (client, paths) in outputs.iter().enumerate() {
        assert_eq!(paths.len(), RUNS_EACH);
        for (run, path) in paths.iter().enumerate() {
            let chunks = png_text_chunks(path);
            let dw: serde_json::Value =
                serde_json::from_str(&chunks.iter().find(|(k, _)| k == "dw").unwrap().1).unwrap();
            assert_eq!(
                dw["arguments"]["prompt"],
                format!("client {client} run {run}"),
                "{}",
                path.display()
            );
            assert_eq!(dw["seed"], 1000 + client * 10 + run);
        }
    }
    for ((client, run), pixels) in references {
        assert_eq!(
            png_pixels(&outputs[client][run]).2,
            pixels,
            "client {client} run {run} differs from the same request run alone"
        );
    }
    assert_eq!(daemon.status()["runs"], 3 + CLIENTS * RUNS_EACH);
}
