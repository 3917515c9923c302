use cache_runtime::cached;

#[derive(Clone)]
pub struct Report { pub lines: Vec<String> }

#[cached]
async fn report(id: u64) -> Result<Report, String> { Ok(Report { lines: vec![id.to_string()] }) }

fn main() {}
