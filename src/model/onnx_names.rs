//! The names of an ONNX graph's inputs and outputs, in order, read straight from the protobuf.
//!
//! tract names a model's inputs and outputs after the graph nodes that produce them, while the
//! manifest (like onnxruntime) names the graph's input and output *values*; the positions are
//! the same, so reading the value names here lets the manifest be checked and mapped.

/// Graph input names (initializers excluded) and output names, in graph order.
pub fn io_names(onnx: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    let graph = fields(onnx)?
        .into_iter()
        .find(|(n, _)| *n == 7)
        .map(|(_, b)| b)
        .ok_or("no graph in the ONNX model")?;
    let (mut inputs, mut outputs, mut initializers) = (Vec::new(), Vec::new(), Vec::new());
    for (field, bytes) in fields(graph)? {
        match field {
            11 => inputs.push(name_of(bytes)?),
            12 => outputs.push(name_of(bytes)?),
            5 => initializers.push(tensor_name(bytes)?),
            _ => {}
        }
    }
    inputs.retain(|i| !initializers.contains(i));
    Ok((inputs, outputs))
}

/// `ValueInfoProto.name` (field 1).
fn name_of(value_info: &[u8]) -> Result<String, String> {
    string_field(value_info, 1)
}

/// `TensorProto.name` (field 8).
fn tensor_name(tensor: &[u8]) -> Result<String, String> {
    string_field(tensor, 8)
}

fn string_field(msg: &[u8], want: u64) -> Result<String, String> {
    let bytes = fields(msg)?
        .into_iter()
        .find(|(n, _)| *n == want)
        .map(|(_, b)| b)
        .unwrap_or_default();
    String::from_utf8(bytes.to_vec()).map_err(|_| "a name that is not UTF-8".to_string())
}

/// The length-delimited fields of a protobuf message (other wire types are skipped).
fn fields(mut msg: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut msg)?;
            }
            1 => msg = msg.get(8..).ok_or("truncated protobuf")?,
            5 => msg = msg.get(4..).ok_or("truncated protobuf")?,
            2 => {
                let len = varint(&mut msg)? as usize;
                let body = msg.get(..len).ok_or("truncated protobuf")?;
                out.push((field, body));
                msg = &msg[len..];
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        }
    }
    Ok(out)
}

fn varint(msg: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = msg.split_first().ok_or("truncated protobuf varint")?;
        *msg = rest;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("protobuf varint too long".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u64, body: &[u8]) -> Vec<u8> {
        let mut v = vec![((field << 3) | 2) as u8, body.len() as u8];
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn reads_inputs_outputs_and_skips_initializers() {
        let value = |name: &str| ld(11, &ld(1, name.as_bytes()));
        let mut graph = Vec::new();
        graph.extend(value("gene_ids"));
        graph.extend(value("values"));
        graph.extend(value("weight"));
        graph.extend(ld(12, &ld(1, b"cell_embedding")));
        graph.extend(ld(5, &ld(8, b"weight")));
        let mut model = vec![0x08, 0x08]; // ir_version = 8 (a varint field)
        model.extend(ld(7, &graph));
        let (i, o) = io_names(&model).unwrap();
        assert_eq!(i, ["gene_ids", "values"]);
        assert_eq!(o, ["cell_embedding"]);
    }
}
