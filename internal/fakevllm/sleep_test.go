package fakevllm

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// call sends a request to the fake and returns its status and body.
func call(t *testing.T, method, url, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func isSleeping(t *testing.T, url string) bool {
	t.Helper()
	code, body := call(t, "GET", url+"/is_sleeping", "")
	var v struct {
		IsSleeping bool `json:"is_sleeping"`
	}
	if code != 200 || json.Unmarshal([]byte(body), &v) != nil {
		t.Fatalf("is_sleeping: %d %s", code, body)
	}
	return v.IsSleeping
}

// TestSleepLevels: the fake sleeps and wakes as vLLM does, each step in
// order, refusing inference while asleep; a level-2 wake that skips
// reload_weights serves nonsense.
func TestSleepLevels(t *testing.T) {
	const chat = `{"model":"m","messages":[],"max_tokens":2}`
	tests := []struct {
		name  string
		steps []string // METHOD path [body]
		want  string   // what a completion says after them: "token", "#####" or 503
	}{
		{"awake", nil, "token"},
		{"level 1", []string{"POST /sleep?level=1"}, "503"},
		{"level 1, woken", []string{"POST /sleep?level=1", "POST /wake_up"}, "token"},
		{"level 2, woken in full", []string{"POST /sleep?level=2", "POST /wake_up?tags=weights",
			`POST /collective_rpc {"method":"reload_weights"}`, "POST /wake_up?tags=kv_cache", "POST /reset_prefix_cache"}, "token"},
		{"level 2, weights only", []string{"POST /sleep?level=2", "POST /wake_up?tags=weights", `POST /collective_rpc {"method":"reload_weights"}`}, "503"},
		{"level 2, never reloaded", []string{"POST /sleep?level=2", "POST /wake_up"}, "#####"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, url := serve(t, Options{Model: "m", SleepMode: true, DevMode: true})
			waitReady(t, url)
			for _, step := range tt.steps {
				method, rest, _ := strings.Cut(step, " ")
				path, body, _ := strings.Cut(rest, " ")
				if code, b := call(t, method, url+path, body); code != 200 {
					t.Fatalf("%s: %d %s", step, code, b)
				}
			}
			code, body := call(t, "POST", url+"/v1/chat/completions", chat)
			switch {
			case tt.want == "503" && code != 503:
				t.Errorf("completion: %d %s, want 503", code, body)
			case tt.want != "503" && (code != 200 || !strings.Contains(body, `"content":"`+tt.want+" "+tt.want+`"`)):
				t.Errorf("completion: %d %s, want %q", code, body, tt.want)
			}
			if got, want := isSleeping(t, url), tt.want == "503"; got != want {
				t.Errorf("is_sleeping %v, want %v", got, want)
			}
		})
	}
}

// TestSleepModeOff: without VLLM_SERVER_DEV_MODE the endpoints do not
// exist; without --enable-sleep-mode /sleep fails.
func TestSleepModeOff(t *testing.T) {
	_, url := serve(t, Options{Model: "m"})
	waitReady(t, url)
	if code, _ := call(t, "POST", url+"/sleep?level=1", ""); code != 404 {
		t.Errorf("no dev mode: /sleep %d, want 404", code)
	}
	_, url = serve(t, Options{Model: "m", DevMode: true})
	waitReady(t, url)
	if code, _ := call(t, "POST", url+"/sleep?level=1", ""); code != 500 {
		t.Errorf("no sleep mode: /sleep %d, want 500", code)
	}
}

// TestSleepDelays: falling asleep and bringing the weights back take the
// configured times; sleeping with a request in flight kills the server.
func TestSleepDelays(t *testing.T) {
	exited := make(chan int, 1)
	_, url := serve(t, Options{Model: "m", SleepMode: true, DevMode: true, SleepDelay: 50 * time.Millisecond, WakeDelay: 100 * time.Millisecond,
		TokensPerSecond: 10, Exit: func(c int) { exited <- c }})
	waitReady(t, url)
	for _, tc := range []struct {
		path string
		min  time.Duration
	}{{"/sleep?level=1", 50 * time.Millisecond}, {"/wake_up", 100 * time.Millisecond}} {
		start := time.Now()
		if code, b := call(t, "POST", url+tc.path, ""); code != 200 {
			t.Fatalf("%s: %d %s", tc.path, code, b)
		}
		if took := time.Since(start); took < tc.min {
			t.Errorf("%s took %v, want at least %v", tc.path, took, tc.min)
		}
	}
	go http.Post(url+"/v1/chat/completions", "application/json", strings.NewReader(`{"model":"m","max_tokens":100}`))
	deadline := time.Now().Add(long)
	for {
		code, body := call(t, "GET", url+"/metrics", "")
		if code == 200 && strings.Contains(body, "vllm:num_requests_running{model_name=\"m\"} 1") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the request never ran")
		}
		time.Sleep(2 * time.Millisecond) // polling interval
	}
	req, _ := http.NewRequest("POST", url+"/sleep?level=1", nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Errorf("sleeping with a request in flight answered %d", resp.StatusCode)
	}
	select {
	case code := <-exited:
		if code != 1 {
			t.Errorf("exit %d", code)
		}
	case <-time.After(long):
		t.Fatal("the server did not die")
	}
}
